"""train.profile_steps: a jax.profiler trace of the chosen steps in workdir/profile/."""
import glob
import os

import pytest

from tests.helpers.train_fixtures import synthetic_config, synthetic_iterator_fn
from tfusion.config import ConfigError
from tfusion.train.loop import Trainer


def test_profile_steps_write_a_trace(tmp_path):
    config = synthetic_config(steps=3, profile_steps=(2, 3))
    result = Trainer(config, str(tmp_path), train_iterator_fn=synthetic_iterator_fn()).run()
    assert result.step == 3
    traces = glob.glob(os.path.join(str(tmp_path), "profile", "**", "*.xplane.pb"),
                       recursive=True)
    assert traces and os.path.getsize(traces[0]) > 0


@pytest.mark.parametrize("value", [(0, 2), (3, 2), (2, 9), (1,), ("a", "b")])
def test_bad_profile_steps_are_refused_at_start_up_naming_the_field(tmp_path, value):
    config = synthetic_config(steps=3, profile_steps=value)
    with pytest.raises(ConfigError, match=r"train\.profile_steps"):
        Trainer(config, str(tmp_path), train_iterator_fn=synthetic_iterator_fn())
    assert not os.path.exists(os.path.join(str(tmp_path), "profile"))
