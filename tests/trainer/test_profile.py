"""``runconfig.profile_steps``: the chosen steps' ``jax.profiler`` trace lands in model_dir/profile,
with the engine's named spans, and only those steps are in it; bad values fail in one line."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.helpers import small_config
from wsjax.errors import ConfigError
from wsjax.train import run

SPANS = (
    "stream/take",
    "dispatch/block_forward",
    "dispatch/block_backward",
    "dispatch/head_loss",
    "wait/previous_item",
    "wait/gradients_to_host",
    "update",
)


def test_profile_steps_write_a_trace_with_the_engine_spans(tmp_path):
    cfg = small_config("runconfig.profile_steps=2-3")
    result = run(cfg, "train", tmp_path / "md", max_steps=4, progress=False)
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    runs = sorted((tmp_path / "md" / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1  # steps 2 and 3 are consecutive: one trace
    assert list(runs[0].glob("*.xplane.pb"))  # what TensorBoard's profile plugin reads
    (perfetto,) = runs[0].glob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e.get("name") for e in events}
    for span in SPANS:
        assert span in names, (span, sorted(n for n in names if n)[:50])
    # the step annotations: exactly the chosen steps, each with its own span per block
    steps = [e for e in events if e.get("name") == "train" and e.get("ph") == "X"]
    assert sorted(int(e["args"]["step_num"]) for e in steps) == [2, 3]
    forwards = [e for e in events if e.get("name") == "dispatch/block_forward"]
    assert len(forwards) == 2 * cfg.model.num_hidden_layers  # 2 steps x L blocks


@pytest.mark.parametrize("value", ["0-2", "3-1", "x", "-1"])
def test_bad_profile_steps_fail_in_one_line(value):
    with pytest.raises(ConfigError, match=r"runconfig\.profile_steps") as e:
        small_config(f"runconfig.profile_steps={value}")
    assert "\n" not in str(e.value)


def test_profile_steps_accepts_a_list_and_one_step():
    assert small_config("runconfig.profile_steps=[5, 3, 5]").runconfig.profile_steps == (3, 5)
    assert small_config("runconfig.profile_steps=7").runconfig.profile_steps == (7,)
    assert small_config().runconfig.profile_steps == ()
