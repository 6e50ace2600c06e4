"""Hugging Face checkpoints in and out, against `transformers` itself (CPU, float32,
random weights from small configs, no download): logits of LlamaForCausalLM (GQA,
llama3 RoPE scaling, a sharded checkpoint) and Qwen2ForCausalLM (q/k/v biases, tied
embeddings) equal tfusion's text forward of the imported run; HF -> tfusion -> HF is
bit-identical and loads in AutoModelForCausalLM; refusals name what and write nothing."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import registry
from tests.helpers import REPO_ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CORPUS = [f"the {c} {s} number {i} sits at the {p}" for i in range(40)
          for c, s, p in (("red", "circle", "top"), ("blue", "square", "left"),
                          ("green", "triangle", "bottom right"))]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _tokenizer(directory, bos=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS if bos else None, "eos_token": EOS}))
    return tok


def _hf_model(tmp_path, kind: str, shard: bool = False):
    directory = tmp_path / f"hf_{kind}"
    directory.mkdir()
    tok = _tokenizer(directory, bos=kind == "llama")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  eos_token_id=tok.token_to_id(EOS), max_position_embeddings=256,
                  initializer_range=0.3)  # peaked logits: greedy ties do not decide
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            bos_token_id=tok.token_to_id(BOS), rope_theta=50000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # random biases, so the test sees them
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(directory, max_shard_size="60KB" if shard else "1GB")
    return directory, model, tok


def _text_logits(model, tokens):
    """tfusion's text-only forward: [B, L] ids -> float32 logits [B, L, V]."""
    b, l = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    segment_ids = jnp.ones((b, l), jnp.int32)
    ctx = model.context(positions, model.mask_info(segment_ids, jnp.full((b, l), -1, jnp.int32)))
    hidden, _ = model.backbone(model.embed_tokens(tokens), ctx)
    return np.asarray(model.logits(model.final_norm(hidden)))


def _assert_logits_match(model, hf_model, hf_vocab: int):
    """tfusion's text logits of random ids equal transformers' to 1e-4; (ids, HF logits)."""
    tokens = np.random.default_rng(0).integers(0, hf_vocab, (2, 40))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = _text_logits(model, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(got[..., :hf_vocab], want, atol=1e-4, rtol=1e-4)
    return tokens, want


@pytest.mark.parametrize("kind,shard", [("llama", True), ("qwen2", False)])
def test_import_matches_transformers_and_round_trips(tmp_path, kind, shard):
    from tfusion.eval.hf_checkpoints import export_hf, import_hf
    from tfusion.autoencoders.safetensors_io import SafetensorsReader, load
    from tfusion.eval.checkpoints import load_model

    hf_dir, hf_model, tok = _hf_model(tmp_path, kind, shard)
    if shard:
        assert (hf_dir / "model.safetensors.index.json").exists()
    workdir = tmp_path / "run"
    record = import_hf(str(hf_dir), str(workdir), registry.get_config("shapes_tiny"))
    assert record["vocab_size"] == record["hf_vocab_size"] + 2  # BOI/EOI appended
    model, config, _ = load_model(str(workdir), params="raw")
    assert config.model.qkv_bias == (kind == "qwen2")
    tokens, want = _assert_logits_match(model, hf_model, record["hf_vocab_size"])

    out = tmp_path / "exported"
    export_hf(str(workdir), str(out), params="raw")
    original = {}
    for f in sorted(p for p in os.listdir(hf_dir) if p.endswith(".safetensors")):
        original.update(load(str(hf_dir / f)))
    with SafetensorsReader(str(out / "model.safetensors")) as exported:
        assert sorted(exported.names) == sorted(original)
        for name in exported.names:
            np.testing.assert_array_equal(exported.read(name), original[name], err_msg=name)
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        np.testing.assert_array_equal(again(torch.tensor(tokens)).logits.numpy(), want)


def test_untied_import_copies_the_text_weights_and_exports_the_twins_beside(tmp_path):
    """An import into an untied model: every image twin equals its text weight, the text
    forward (routed in tiles) equals transformers, and the export writes the same
    Hugging Face tensors with the twins in image_layers.safetensors."""
    from flax import nnx

    from tfusion.autoencoders.safetensors_io import SafetensorsReader, load
    from tfusion.eval.checkpoints import load_model
    from tfusion.eval.hf_checkpoints import export_hf, import_hf
    from tfusion.model.transfusion import image_twin_of

    hf_dir, hf_model, _ = _hf_model(tmp_path, "qwen2")
    config = registry.get_config("shapes_tiny")
    config.model.update(modality_weights="untied", untied_init="copy", untied_tile=16)
    workdir = tmp_path / "run"
    record = import_hf(str(hf_dir), str(workdir), config)
    model, _, _ = load_model(str(workdir), params="raw")
    flat = nnx.traversals.flatten_mapping(nnx.state(model, nnx.Param).to_pure_dict())
    twins = {p: image_twin_of(p) for p in flat if image_twin_of(p) is not None}
    assert len(twins) >= 7  # qkv (+ bias), out, gate_up, down, two norms, final norm
    for twin, text in twins.items():
        np.testing.assert_array_equal(flat[twin], flat[text], err_msg=str(twin))
    _assert_logits_match(model, hf_model, record["hf_vocab_size"])
    out = tmp_path / "exported"
    export_hf(str(workdir), str(out), params="raw")
    assert sorted(SafetensorsReader(str(out / "model.safetensors")).names) == sorted(
        load(str(hf_dir / "model.safetensors")))
    image = SafetensorsReader(str(out / "image_layers.safetensors")).names
    assert {".".join(p) for p in twins} <= set(image)


def test_greedy_text_generation_through_the_cli_equals_transformers(tmp_path):
    from tfusion.eval.hf_checkpoints import import_hf

    hf_dir, hf_model, tok = _hf_model(tmp_path, "llama")
    workdir = tmp_path / "run"
    import_hf(str(hf_dir), str(workdir), registry.get_config("shapes_tiny"))
    prompt = "the red circle sits at"
    out = tmp_path / "gen"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.generate", f"--workdir={workdir}", "--mode=text",
         f"--prompt={prompt}", "--max_new_tokens=16", "--temperature=0", f"--out={out}",
         "--params=raw"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.load(open(out / "sample_0.json"))["token_segments"][0]
    ids = [tok.token_to_id(BOS)] + tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        # An explicit attention mask: inferred from a pad id it would hide the BOS (id 0).
        theirs = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                   max_new_tokens=16, do_sample=False,
                                   pad_token_id=tok.token_to_id(EOS))[0, len(ids):].tolist()
    assert len(theirs) >= 8
    assert ours == theirs, (ours, theirs)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(model_type="gemma"), "model_type 'gemma'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
                        rope_scaling=None), "rope scaling type 'yarn'"),
    (lambda c: c.update(intermediate_size=128), "has shape"),
    (lambda c: c.update(eos_token_id=7), "eos_token_id"),
])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, edit, message):
    from tfusion.eval.hf_checkpoints import import_hf
    from tfusion.hf import HFCheckpointError

    hf_dir, _, _ = _hf_model(tmp_path, "llama")
    config = json.load(open(hf_dir / "config.json"))
    edit(config)
    (hf_dir / "config.json").write_text(json.dumps(config))
    workdir = tmp_path / "run"
    with pytest.raises(HFCheckpointError, match=message.replace("(", r"\(")):
        import_hf(str(hf_dir), str(workdir), registry.get_config("shapes_tiny"))
    assert not workdir.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".import_hf_")]


def test_cli_refusal_is_one_line(tmp_path):
    hf_dir, _, _ = _hf_model(tmp_path, "llama")
    (hf_dir / "model.safetensors").unlink()
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "launch.import_hf", f"--hf_dir={hf_dir}",
                           f"--workdir={workdir}"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no model.safetensors" \
        in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()
