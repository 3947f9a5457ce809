"""Property-based fuzzing (hypothesis, derandomised: the same examples every run). Generated
`key=value` overrides for every shipped config, and generated malformed checkpoint files. The
invariant: success, or a one-line error naming the culprit (the override, the key, the file);
never a traceback, a hang or a partly written output. CI runs FUZZ_OVERRIDES / FUZZ_FILES
examples; `-m slow` runs ten times as many."""
import io
from collections import Counter
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from dgm_scale.cli import main
from dgm_scale.config import ConfigError, load_config, to_dict
from dgm_scale.modules import build_module
from dgm_scale.training import train
from helpers import ROOT, TINY, hang_guard, leaf_keys

FUZZ_OVERRIDES, FUZZ_FILES = 500, 200
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

#: values YAML and OmegaConf read in surprising ways
ODD_VALUES = ["~", "null", "yes", "no", "on", "0o17", "0x1F", "1_000", ".nan", ".inf", "-.inf", "1e309", "nan",
              "-0", "99999999999999999999999", "[1, 2", "{a: 1}", "{", "]", "[]", "{}", "[[[]]]", "- x", "|", ">",
              "!!python/object/apply:os.system ['true']", "!!binary aGk=", "&a 1", "*a", "'unclosed", '"q',
              "${oc.env:HOME}", "${model}", "${nope}", "${", "${model.latent_dim}", "\x00", "\t", " ", "%", "@x",
              "`x`", "#c", "x #c", "a=b", "ünï©ødé", "🙂", "''", '""', "true", "False"]


def _keys_by_config() -> dict:
    return {path: leaf_keys(to_dict(load_config(path))) for path in CONFIGS}


KEYS = _keys_by_config()


@st.composite
def overrides(draw):
    """(config file, one override): a real key of that config, or one bent out of shape, with a
    value of any type or an oddity."""
    config = draw(st.sampled_from(CONFIGS))
    key = draw(st.sampled_from(KEYS[config]))
    key = draw(st.sampled_from([key, key, key, f"{key}.extra", key.replace(".", "..", 1), f"ü{key}", f".{key}",
                                key.rsplit(".", 1)[0], key.upper(), f"{key}[0]"]))
    value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.integers(-2**70, 2**70).map(str),
                           st.floats(allow_nan=True, allow_infinity=True).map(repr),
                           st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3).map(str)))
    return config, f"{key}={value}"


def assert_one_line_naming(error: ConfigError, *culprits: str) -> None:
    message = str(error)
    assert "\n" not in message and message.strip(), repr(message)
    assert any(culprit in message for culprit in culprits) or "config key '" in message, message


def check_override(config: Path, item: str) -> str:
    """The outcome of `item` over `config`: built, or refused (by the loader, or while building)."""
    key = item.split("=", 1)[0]
    with hang_guard(30):
        try:
            cfg = load_config(config, [item])
        except ConfigError as error:
            assert_one_line_naming(error, item, key)
            return "refused when loaded"
        try:
            with torch.device("meta"):  # every check runs, but a valid 20 GiB model takes no memory
                build_module(cfg)
        except ConfigError as error:
            assert_one_line_naming(error, item, key)
            return "refused when built"
    return "built"


#: no shrinking: a failure prints the example that failed, and shrinking a slow one can take minutes
FUZZ_SETTINGS = dict(derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("examples", [pytest.param(FUZZ_OVERRIDES, id="ci"),
                                      pytest.param(10 * FUZZ_OVERRIDES, id="many", marks=pytest.mark.slow)])
def test_generated_overrides_load_or_fail_in_one_line(examples):
    outcomes = Counter()

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(overrides())
    # One case of each outcome whatever the draw: the derandomized draw follows the list of keys,
    # so a new config key can shift it past every case refused when built.
    @example((ROOT / "configs" / "gan.yaml", "model.discriminator.width=879733"))
    def run(case):
        outcomes[check_override(*case)] += 1

    run()
    print(f"{sum(outcomes.values())} generated overrides: {dict(outcomes)}")
    assert sum(outcomes.values()) >= examples and len(outcomes) == 3, outcomes


#: cases the fuzzer found, kept as plain regression tests: (config, override, what the line names)
FOUND = [("gan.yaml", "model.discriminator.width=879733", "model.discriminator"),  # 92,000 GiB of weights
         ("wgan_gp.yaml", "model.generator.width=51149910764", "model.generator"),  # sizes overflow int64
         ("autoregressive.yaml", "model.layers=88161484", "model.layers"),  # minutes to build, even on meta
         ("ssgan.yaml", "aug.policy.extra=-746078", "aug.policy.extra"),  # a key below a string
         ("gan.yaml", "run.num_samples=\n\U000b1c7c", "run.num_samples"),  # a line break in the value
         ("vae.yaml", "run.name=${nope}", "nope")]  # an interpolation to nothing


@pytest.mark.parametrize("config, item, named", FOUND, ids=[case[1][:30] for case in FOUND])
def test_found_cases_are_refused_in_one_line(config, item, named):
    with pytest.raises(ConfigError) as error:
        cfg = load_config(ROOT / "configs" / config, [item])
        with hang_guard(30):
            build_module(cfg)
    assert "\n" not in str(error.value) and named in str(error.value), error.value


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    return train(load_config(overrides=[*TINY, "trainer.max_steps=2", f"run.dir={run_dir}"])).checkpoint.read_bytes()


def _archive(kind: str, payload: bytes) -> bytes:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo("data.pkl")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


#: JSON-like values to put where a checkpoint's config or state_dict belongs
JUNK = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@st.composite
def malformed_checkpoints(draw, original: bytes) -> bytes:
    """A checkpoint's bytes damaged one way: truncated, bits flipped, empty, random bytes, another
    archive kind, or a real torch file with the wrong contents."""
    how = draw(st.sampled_from(["truncate", "flip", "empty", "random", "zip", "tar", "config", "state"]))
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "flip":
        data = bytearray(original)
        for position in draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8)):
            data[position // 8] ^= 1 << (position % 8)
        return bytes(data)
    if how == "empty":
        return b""
    if how == "random":
        return draw(st.binary(min_size=1, max_size=256))
    if how in ("zip", "tar"):
        return _archive(how, draw(st.binary(max_size=64)))
    checkpoint = torch.load(io.BytesIO(original), map_location="cpu", weights_only=True)
    if how == "config":
        config = checkpoint["hyper_parameters"]["config"]
        section = draw(st.sampled_from(sorted(config)))
        config[section] = draw(JUNK) if draw(st.booleans()) else {**config[section], **draw(
            st.dictionaries(st.sampled_from(sorted(config[section]) if isinstance(config[section], dict) else ["x"]),
                            JUNK, max_size=2))}
    else:
        state = checkpoint["state_dict"]
        name = draw(st.sampled_from(sorted(state)))
        state[name] = draw(st.sampled_from([torch.zeros(1), torch.zeros(state[name].shape, dtype=torch.int8), None]))
    return _saved(checkpoint)


def check_checkpoint(data: bytes, folder: Path, capsys) -> str:
    """`dgm-scale sample` on `data`: a PNG, or exit code 2 with one line naming the file and no PNG."""
    path, out = folder / "fuzzed.ckpt", folder / "fuzzed.png"
    path.write_bytes(data)
    out.unlink(missing_ok=True)
    with hang_guard(60):
        code = main(["sample", str(path), "--num", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    if code == 0:
        assert out.is_file()
        return "sampled"
    assert code == 2 and len(err.splitlines()) == 1 and str(path) in err, err
    assert not out.exists() and not list(folder.glob("*.tmp*"))
    return "refused"


@pytest.mark.parametrize("examples", [pytest.param(FUZZ_FILES, id="ci"),
                                      pytest.param(10 * FUZZ_FILES, id="many", marks=pytest.mark.slow)])
def test_malformed_checkpoints_load_or_fail_in_one_line(examples, checkpoint_bytes, tmp_path, capsys):
    outcomes = Counter()

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(malformed_checkpoints(checkpoint_bytes))
    def run(data):
        outcomes[check_checkpoint(data, tmp_path, capsys)] += 1

    run()
    with capsys.disabled():
        print(f"\n{sum(outcomes.values())} generated checkpoint files: {dict(outcomes)}")
    assert sum(outcomes.values()) >= examples, outcomes
