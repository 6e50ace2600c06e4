"""Bad inputs are refused with an error naming what is wrong, never a deep traceback:
autoencoder weight files, tokenizer models, pickles on a load path, the run directory
/ checkpoint step given to launch.generate and launch.evaluate, and the weights given
to launch.encode_latents."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from data_pipelines import tokenizer as tk
from data_pipelines.config import validate_data_config
from experiments import registry
from tests.helpers.autoencoders import TINY_AUTOENCODER as TINY
from tfusion.autoencoders import AutoencoderKL, VQModel, load_pretrained
from tfusion.autoencoders import diffusers_weights, safetensors_io
from tfusion.config import ConfigError
from tests.helpers import REPO_ROOT



# --- autoencoder weights -------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """{model class: (directory holding its config.json, tensors that fit it)}. The
    tensors are zeros of the right shapes: building real models would only cost time."""
    out = {}
    for cls in (AutoencoderKL, VQModel):
        directory = str(tmp_path_factory.mktemp(cls.__name__))
        abstract = nnx.eval_shape(lambda: cls(TINY, rngs=nnx.Rngs(0)))
        tensors = {key: np.zeros(shape, np.float32)
                   for key, shape in diffusers_weights.tensor_shapes(abstract).items()}
        with open(os.path.join(directory, diffusers_weights.CONFIG_FILE), "w") as f:
            json.dump(TINY.to_diffusers_dict(cls.__name__), f)
        out[cls] = directory, tensors
    return out


def _weights_dir(saved_weights, cls, tmp_path, tensors=None) -> tuple[str, str]:
    """(directory, weights file) holding `cls`'s config.json and `tensors`."""
    source, zeros = saved_weights[cls]
    directory = str(tmp_path / "weights")
    os.makedirs(directory)
    shutil.copy(os.path.join(source, diffusers_weights.CONFIG_FILE), directory)
    path = os.path.join(directory, diffusers_weights.WEIGHTS_FILE)
    safetensors_io.save(path, zeros if tensors is None else tensors)
    return directory, path


@pytest.mark.parametrize("cls,key,shape", [
    (AutoencoderKL, "decoder.conv_out.weight", None),  # a conv kernel missing
    (AutoencoderKL, "encoder.conv_in.weight", (8, 3, 1, 1)),  # same rank, other size
    (AutoencoderKL, "encoder.mid_block.attentions.0.to_q.weight", (16,)),  # other rank
    (VQModel, "quantize.embedding.weight", None),  # the codebook missing
    (VQModel, "quantize.embedding.weight", (9, 4)),
])
def test_missing_or_misshapen_tensor_names_key_shapes_and_file(saved_weights, tmp_path, cls,
                                                               key, shape):
    tensors = dict(saved_weights[cls][1])
    expected = tensors.pop(key).shape
    if shape is not None:
        tensors[key] = np.zeros(shape, np.float32)
    directory, path = _weights_dir(saved_weights, cls, tmp_path, tensors)
    with pytest.raises(diffusers_weights.WeightsError) as err:
        load_pretrained(directory)
    message = str(err.value)
    assert path in message and key in message, message
    assert "kernel" not in message  # the file's names, not our parameter paths
    if shape is None:
        assert f"missing parameter {key}" in message, message
    else:
        assert f"shape {shape} in the file, the model expects {expected}" in message, message
        assert message.count(key) == 1, message  # not also reported as missing


def test_legacy_and_current_name_for_one_parameter_is_refused(saved_weights, tmp_path):
    tensors = dict(saved_weights[AutoencoderKL][1])
    current = "encoder.mid_block.attentions.0.to_q.weight"
    legacy = "encoder.mid_block.attentions.0.query.weight"
    tensors[legacy] = tensors[current]
    directory, _ = _weights_dir(saved_weights, AutoencoderKL, tmp_path, tensors)
    with pytest.raises(diffusers_weights.WeightsError, match="sets the same parameter as"):
        load_pretrained(directory)


def test_matching_weights_still_load(saved_weights, tmp_path):
    directory, _ = _weights_dir(saved_weights, AutoencoderKL, tmp_path)
    assert isinstance(load_pretrained(directory), AutoencoderKL)


def _not_safetensors(saved_weights, tmp_path) -> dict[str, bytes]:
    """File contents that are no safetensors file, each named by what is wrong."""
    path = os.path.join(str(tmp_path), "valid.safetensors")
    safetensors_io.save(path, saved_weights[AutoencoderKL][1])
    with open(path, "rb") as f:
        valid = f.read()
    header_len = int.from_bytes(valid[:8], "little")
    return {
        "empty": b"",
        "text": b"this is a plain text file, not tensors\n" * 4,
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": valid[:len(valid) - 100],  # the last tensor's bytes cut off
        "header_not_json": valid[:8] + b"x" * header_len + valid[8 + header_len:],
        "header_a_list": _with_header(b"[1, 2]", b""),
        "offsets_short_of_shape": _with_header(
            b'{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', bytes(8)),
    }


def _with_header(header: bytes, body: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + body


@pytest.mark.parametrize("kind", ["empty", "text", "random", "truncated", "header_not_json",
                                  "header_a_list", "offsets_short_of_shape", "missing",
                                  "directory"])
def test_unreadable_safetensors_file_names_its_path(saved_weights, tmp_path, kind):
    path = str(tmp_path / "model.safetensors")
    if kind == "directory":
        os.makedirs(path)
    elif kind != "missing":
        with open(path, "wb") as f:
            f.write(_not_safetensors(saved_weights, tmp_path)[kind])
    with pytest.raises(safetensors_io.SafetensorsError) as err:
        safetensors_io.load(path)
    assert str(err.value).startswith(f"{path}: "), str(err.value)


def test_not_safetensors_weights_file_through_load_pretrained(saved_weights, tmp_path):
    directory, path = _weights_dir(saved_weights, AutoencoderKL, tmp_path)
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: not a safetensors file"):
        load_pretrained(directory)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"act_fn": "relu"}'])
def test_bad_autoencoder_config_json_names_its_path(tmp_path, content):
    config = tmp_path / diffusers_weights.CONFIG_FILE
    if content is not None:
        config.write_text(content)
    with pytest.raises(diffusers_weights.WeightsError, match=f"^{re.escape(str(config))}: "):
        load_pretrained(str(tmp_path))


# --- tokenizer -----------------------------------------------------------------------

def _bad_tokenizer_path(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.model"
    if kind == "text":
        path.write_text("the red circle sits at the top\n" * 20)
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    return str(path)  # "missing": never written


TOKENIZER_KINDS = ["text", "random", "empty", "directory", "missing"]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_load_tokenizer_refuses_non_sentencepiece_files(tmp_path, kind):
    path = _bad_tokenizer_path(tmp_path, kind)
    with pytest.raises(tk.TokenizerError) as err:
        tk.load_tokenizer(path)
    assert repr(path) in str(err.value)


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_config_validation_names_data_tokenizer_and_path(tmp_path, kind):
    config = registry.get_config("shapes_tiny")
    config.data.tokenizer = _bad_tokenizer_path(tmp_path, kind)
    with pytest.raises(ConfigError) as err:
        validate_data_config(config)
    assert err.value.field == "data.tokenizer"
    assert repr(config.data.tokenizer) in str(err.value)


# --- no pickle on any load path ------------------------------------------------------

SOURCE_DIRS = ("tfusion", "data_pipelines", "launch", "experiments", "benchmarks")
# Modules whose loading runs pickle (or, for marshal, code objects).
_UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib",
                       "shelve", "marshal"}
# Loaders that unpickle unless told not to: keyword that must be given, and its value.
_GUARDED_LOADERS = {"numpy.load": ("allow_pickle", False),
                    "jax.numpy.load": ("allow_pickle", False),
                    "torch.load": ("weights_only", True)}


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> module it is bound to by any import in the file."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:  # `import a.b` binds `a`
                    root = alias.name.split(".")[0]
                    aliases[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """`np.load` -> 'numpy.load' (imports resolved); '' for anything but a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _is_constant(node: ast.AST, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unpickling_sites(source: str, filename: str = "<snippet>") -> list[str]:
    """Places in `source` where loading data could unpickle it."""
    tree = ast.parse(source, filename)
    aliases = _module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            for name in names:
                if name.split(".")[0] in _UNPICKLING_MODULES:
                    found.append(f"{where}: imports {name}")
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:  # `from numpy import load` would hide the check
                    if f"{node.module}.{alias.name}" in _GUARDED_LOADERS:
                        found.append(f"{where}: imports {node.module}.{alias.name} by name")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in _GUARDED_LOADERS:
                keyword, safe = _GUARDED_LOADERS[name]
                if not _is_constant(keywords.get(keyword), safe):
                    found.append(f"{where}: {name} without {keyword}={safe}")
            elif "allow_pickle" in keywords and not _is_constant(keywords["allow_pickle"],
                                                                 False):
                found.append(f"{where}: {name or 'a call'} with allow_pickle not False")
            if name.endswith("read_pickle"):
                found.append(f"{where}: {name}")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle\n",
    "import cloudpickle as cp\n",
    "from joblib import load\n",
    "import numpy as np\nx = np.load('a.npz')\n",
    "import numpy\nx = numpy.load('a.npy', allow_pickle=True)\n",
    "import jax.numpy as jnp\nx = jnp.load('a.npy')\n",
    "from jax import numpy as xnp\nx = xnp.load('a.npy', **kw)\n",
    "from numpy import load\n",
    "def f():\n    import torch\n    return torch.load('m.pt')\n",
    "import torch\ntorch.load('m.pt', weights_only=False)\n",
    "import numpy as np\nnp.lib.format.read_array(f, allow_pickle=True)\n",
    "import pandas as pd\npd.read_pickle('a.pkl')\n",
])
def test_unpickling_check_flags(snippet):
    assert unpickling_sites(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nx = np.load('a.npz', allow_pickle=False)\n",
    "import torch\ntorch.load('m.pt', weights_only=True)\n",
    "import json\njson.load(f)\n",
    "from tfusion.autoencoders import safetensors_io\nsafetensors_io.load('w.safetensors')\n",
])
def test_unpickling_check_passes_safe_loads(snippet):
    assert unpickling_sites(snippet) == []


def test_no_load_path_can_unpickle():
    found, files = [], 0
    for top in SOURCE_DIRS:
        for directory, _, names in os.walk(os.path.join(REPO_ROOT, top)):
            for name in sorted(n for n in names if n.endswith(".py")):
                path = os.path.join(directory, name)
                with open(path, encoding="utf-8") as f:
                    found += unpickling_sites(f.read(), os.path.relpath(path, REPO_ROOT))
                files += 1
    assert files > 50  # the walk really saw the sources
    assert found == [], "\n".join(found)


# --- a bad run directory / checkpoint step, and the CLIs' one-line errors --------------

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
           XLA_FLAGS="--xla_force_host_platform_device_count=1")
SAVED_STEPS = (2, 4)


def _write_run_config(workdir: str) -> None:
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(registry.get_config("shapes_tiny").to_json_best_effort(indent=2))


def _save_checkpoints(directory: str) -> None:
    """Real orbax checkpoints at SAVED_STEPS; their content never matters, since a
    missing step is refused before anything is restored."""
    from tfusion.train.checkpoint import Checkpointer

    checkpointer = Checkpointer(directory, keep=10, async_save=False)
    for step in SAVED_STEPS:
        checkpointer.save(step, {"x": np.zeros(2, np.float32)}, [None])
    checkpointer.close()


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """{case: (workdir, --step or None, the RunNotFoundError message)}."""
    base = tmp_path_factory.mktemp("runs")
    missing, empty = str(base / "missing"), str(base / "empty")
    no_checkpoints, empty_checkpoints = str(base / "no_ckpt"), str(base / "empty_ckpt")
    trained = str(base / "trained")
    os.makedirs(empty)
    for workdir in (no_checkpoints, empty_checkpoints, trained):
        _write_run_config(workdir)
    os.makedirs(os.path.join(empty_checkpoints, "checkpoints"))
    _save_checkpoints(os.path.join(trained, "checkpoints"))
    available = ", ".join(map(str, SAVED_STEPS))
    return {
        "missing_workdir": (missing, None, f"no run directory {missing}"),
        "no_config": (empty, None, f"no config.json in {empty} (not a training run directory?)"),
        "no_checkpoints_dir": (no_checkpoints, None,
                               f"no checkpoint in {no_checkpoints}/checkpoints"),
        "empty_checkpoints_dir": (empty_checkpoints, None,
                                  f"no checkpoint in {empty_checkpoints}/checkpoints"),
        "unsaved_step": (trained, 7, f"no checkpoint for step 7 in {trained}/checkpoints; "
                                     f"available: {available}"),
    }


@pytest.mark.parametrize("case", ["missing_workdir", "no_config", "no_checkpoints_dir",
                                  "empty_checkpoints_dir", "unsaved_step"])
def test_load_model_names_what_is_missing(bad_runs, case):
    from tfusion.eval.checkpoints import RunNotFoundError, load_model

    workdir, step, expected = bad_runs[case]
    with pytest.raises(RunNotFoundError) as err:
        load_model(workdir, step)
    assert str(err.value) == expected
    if case == "missing_workdir":
        assert not os.path.exists(workdir)  # nothing created on the way
    if case == "no_checkpoints_dir":
        assert not os.path.exists(os.path.join(workdir, "checkpoints"))


# Each CLI run costs seconds of imports: every case runs in-process above, the CLIs
# get one case per error path they reach.
CLI_CASES = [("launch.generate", "missing_workdir"), ("launch.generate", "no_checkpoints_dir"),
             ("launch.generate", "unsaved_step"), ("launch.evaluate", "no_config"),
             ("launch.evaluate", "unsaved_step"), ("launch.encode_latents", "bad_weights")]


def _cli_command(script: str, case: str, bad_runs, saved_weights, base) -> tuple[list, str]:
    """(command line, the one line it must end stderr with)."""
    if case == "bad_weights":
        directory = str(base / "weights")
        os.makedirs(directory)
        shutil.copy(os.path.join(saved_weights[AutoencoderKL][0], diffusers_weights.CONFIG_FILE),
                    directory)
        path = os.path.join(directory, diffusers_weights.WEIGHTS_FILE)
        with open(path, "wb") as f:
            f.write(b"junk")
        args = ["--config=experiments/registry.py:shapes_tiny", "--config.data.encoder=vae",
                f"--config.data.encoder_path={directory}", f"--out={base / 'latents'}"]
        return args, (f"error: {path}: not a safetensors file (4 bytes, shorter than the "
                      "8-byte header length)")
    workdir, step, message = bad_runs[case]
    args = [f"--workdir={workdir}"] + ([f"--step={step}"] if step is not None else [])
    args += [f"--out={base / 'out'}"] if script == "launch.generate" else ["--suite=text"]
    return args, f"error: {message}"


@pytest.fixture(scope="module")
def cli_results(bad_runs, saved_weights, tmp_path_factory):
    """{(script, case): (exit code, stderr, expected last line)}; all started at once
    (each is mostly imports)."""
    base = tmp_path_factory.mktemp("cli")
    procs = {}
    for script, case in CLI_CASES:
        args, expected = _cli_command(script, case, bad_runs, saved_weights, base)
        procs[script, case] = expected, subprocess.Popen(
            [sys.executable, "-m", script, *args], cwd=REPO_ROOT, env=ENV, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for key, (expected, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        results[key] = proc.returncode, stderr, expected
    return results


@pytest.mark.slow
@pytest.mark.parametrize("script,case", CLI_CASES)
def test_cli_bad_input_is_one_line_error(cli_results, script, case):
    returncode, stderr, expected = cli_results[script, case]
    assert returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == expected, stderr[-3000:]
