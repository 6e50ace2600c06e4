"""Registry entries, paper parameter counts (abstract), sweeps and the listing."""
import pytest

from experiments import ablations, paper, registry, sweeps
from launch import sweep as sweep_launcher
from tfusion.scaling.compute import tokens_per_step, trained_params


def test_every_entry_builds_with_a_one_line_description():
    for name, entry in registry.EXPERIMENTS.items():
        assert entry.description and "\n" not in entry.description, name
        assert registry.get_config(name).name == name


@pytest.mark.parametrize("size", list(paper.PAPER_SIZES))
def test_paper_sizes_match_table_2_within_5_percent(size):
    config = registry.get_config(f"transfusion_{size}")
    n = trained_params(config.model)
    assert abs(n / paper.PAPER_PARAMS[size] - 1) < 0.05, f"{size}: {n / 1e9:.3f}B"
    assert tokens_per_step(config) == 4096 * 512  # the paper's 2M-token batches


def test_paper_recipe_fields():
    c = registry.get_config("transfusion_0.37B_unet_p4")
    assert (c.model.modality_layer, c.model.patch_size, c.data.seq_len) == ("unet", 4, 4096)
    assert (c.optimizer.learning_rate, c.optimizer.warmup_steps) == (3e-4, 4000)
    assert c.optimizer.final_learning_rate == 1.5e-5 and c.data.text_token_share == 0.5
    assert c.diffusion.loss_weight == 5.0 and c.diffusion.noise_limit_t == 500
    # Image slots fit the row: p1 images are 1024 patches + BOI/EOI.
    assert registry.get_config("transfusion_0.16B_linear_p1").data.max_images_per_row == 3


def test_ablations_change_only_their_field():
    base = registry.get_config("transfusion_0.76B").to_dict()
    for suffix, (_, overrides) in ablations.ABLATIONS.items():
        config = registry.get_config(f"transfusion_0.76B_{suffix}").to_dict()
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            assert config[section][field] == value and base[section][field] != value
    noise_off = registry.get_config("transfusion_0.76B_no_noise_limit").diffusion
    assert noise_off.noise_limit_t == noise_off.num_train_steps - 1


def test_sweeps_expand_to_registered_experiments():
    for name in sweeps.SWEEPS:
        for run in sweeps.expand(name):
            assert run.experiment in registry.EXPERIMENTS, (name, run)


def test_cpu_micro_is_four_sizes_times_two_families():
    runs = [r for r in sweeps.expand("cpu_micro") if r.program == "train"]
    assert len(runs) == 8 and {r.family for r in runs} == {"transfusion", "chameleon"}
    for family in ("transfusion", "chameleon"):
        counts = {trained_params(registry.get_config(r.experiment).model)
                  for r in runs if r.family == family}
        assert len(counts) == 4, family


def test_cpu_micro_trains_its_vq_tokenizer_first_and_points_chameleon_at_it():
    runs = sweeps.expand("cpu_micro")
    tokenizer = runs[0]
    assert tokenizer.program == "train_autoencoder"
    cmd = sweep_launcher.train_command(tokenizer, "/sweep")
    assert cmd[:3] == ["python", "-m", "launch.train_autoencoder"]
    weights = f"/sweep/{tokenizer.name}/autoencoder"
    for run in runs[1:]:
        config = sweep_launcher.run_config(run, "/sweep")
        if run.family == "chameleon":
            assert f"--config.data.encoder_path={weights}" in sweep_launcher.train_command(
                run, "/sweep")
            assert config.data.encoder_path == weights and config.data.encoder == "vq"
        else:
            assert config.data.encoder == "identity"
    vq = registry.get_config(tokenizer.experiment)
    # The tokenizer's codes are what the micro Chameleon models expect: f4 at their px.
    ch = registry.get_config("micro_chameleon_w64")
    assert vq.data.image_size == ch.data.image_size
    assert vq.autoencoder.num_vq_embeddings == ch.model.codebook_size
    factor = 2 ** (len(vq.autoencoder.block_out_channels) - 1)
    assert (vq.data.image_size // factor) ** 2 == ch.model.image_tokens


def test_token_budget_sweep_sets_steps():
    runs = sweeps.expand("paper_token_budgets")
    assert len(runs) == 4 * 5 * 2
    run = next(r for r in runs if r.name == "chameleon_7B_500Btok")
    assert run.overrides == {"train.steps": 238_419}  # 500B / 2,097,152 tokens per step


def test_train_command_and_overrides():
    run = sweeps.expand("cpu_smoke")[0]
    cmd = sweep_launcher.train_command(run, "/sweep")
    assert cmd[:3] == ["python", "-m", "launch.train"]
    assert "--config=experiments/registry.py:micro_transfusion_w64" in cmd
    assert "--workdir=/sweep/transfusion_w64" in cmd and "--config.train.steps=6" in cmd
    assert sweep_launcher.run_config(run, "/sweep").train.steps == 6


def test_list_experiments_json_keys():
    from launch.list_experiments import rows
    entries = rows("chameleon_0.16B")
    assert entries and set(entries[0]) == {"name", "params", "tokens_per_step", "description"}
