"""Fuzzed command lines never show the user a traceback: exit 0, or one `lbridge: error:` line.

The CLI runs in-process (a subprocess per example would take minutes). The commands' `run` is
replaced by what they check before loading a pipeline (ratio, model and method constructors, prompt
set), so a well-formed random config costs milliseconds and nothing is sampled or written.
"""

from __future__ import annotations

import contextlib
import io
import string
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf

from lbridge import cli
from lbridge.commands.setup import build_adapter, build_method, target_ratio
from lbridge.prompts import load_prompts

KEYS = ["model", "method", "prompts", "ratio", "num_prompts", "seed", "output_root", "schedule",
        "schedule.warmup", "schedule.spacing", "schedule.interval", "timing.warmup_runs", "model.dtype",
        "model.num_inference_steps", "model.guidance_scale", "model.height", "model.device", "model.path",
        "method.site", "method.order", "method.threshold", "prompts.path", "prompts.offset",
        "model.metrics"]  # fmt: skip
VALUES = ["tiny", "flux", "fora", "none", "taylorseer", "digits", "0", "-1", "3", "2.5", "1e9", "nan",
          "inf", "null", "true", "[]", "[1,2]", "{a: 1}", "${oops}", "${ratio}", "abc", "''", "a,b", "=",
          "'x", "/nowhere", "cuda:7", "float8", "stack", "attn_mlp", "interval", "even", "\\",
          "ratio=2"]  # fmt: skip
TEXT = st.text(alphabet=string.printable.strip() + " ", max_size=8)
OVERRIDE = st.one_of(
    st.builds(lambda p, k, v: f"{p}{k}={v}", st.sampled_from(["", "", "+", "~", "++"]),
              st.sampled_from(KEYS), st.one_of(st.sampled_from(VALUES), TEXT)),
    st.builds(lambda k, v: f"{k}={v}", TEXT, st.sampled_from(VALUES)),  # garbage keys
    TEXT,  # not an override at all
)  # fmt: skip


def checks_before_loading(cfg: DictConfig) -> None:
    target_ratio(cfg)
    build_adapter(cfg)
    build_method(cfg.method)
    load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)


def checks_before_calibrating(cfg: DictConfig) -> None:
    """`lbridge calibrate` and `analyze`: the same, and their training prompts."""
    checks_before_loading(cfg)
    calibration = cfg.method.get("calibration", {})
    load_prompts(cfg.prompts, calibration.get("num_prompts", 5), calibration.get("seed", 1000))


def every_value(cfg: DictConfig) -> None:
    """`lbridge report` reads its config's values alone before it reads the runs."""
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


# The commands whose `run` the fuzz replaces, by what they check before loading anything.
CHECKED_COMMANDS = {"sample": checks_before_loading, "eval": checks_before_loading,
                    "collect": checks_before_loading, "calibrate": checks_before_calibrating,
                    "analyze": checks_before_calibrating, "report": every_value}  # fmt: skip


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as patches:
        for command, checks in CHECKED_COMMANDS.items():
            patches.enter_context(mock.patch(f"lbridge.commands.{command}.run", checks))
        patches.enter_context(contextlib.redirect_stdout(out))
        patches.enter_context(contextlib.redirect_stderr(err))
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    cli.FAILED_JOBS.clear()
    return code, out.getvalue() + err.getvalue(), err.getvalue()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(CHECKED_COMMANDS)), st.lists(OVERRIDE, min_size=1, max_size=3))
# Found by this test (each printed a traceback before it was fixed):
@example("sample", ["ratio=${oops}"])
@example("sample", ["ratio=nan"])
@example("sample", ["model.device=cuda:7"])
@example("eval", ["-cn", "schedule=1"])
@example("sample", ["=0"])
@example("sample", ["++prompts.path=x"])
@example("sample", ["++prompts.offset="])
@example("sample", ["--", "-qP_I^8"])
@example("collect", ["~num_prompts=5"])
@example("sample", ["~seed"])
@example("report", ["-=vCuvn={a: 1}"])  # argparse hands Hydra a '-' argument with a space
@example("sample", ["-1"])  # or a negative number
def test_fuzzed_overrides_never_show_a_traceback(command, overrides):
    code, output, stderr = run_cli([command, *overrides])
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output, output
    if code != 0:
        lines = stderr.strip().splitlines()
        if any(o.startswith("-") for o in overrides) and lines[0].startswith("usage: "):
            # A malformed Hydra flag (`--cfg nonsense`): argparse's usage, then one error line.
            assert lines[-1].startswith(f"lbridge {command}: error: "), output
        else:
            assert len(lines) == 1 and lines[0].startswith("lbridge: error: "), output
