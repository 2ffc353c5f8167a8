"""bench/criteria_steps.py: the criteria's timing read back from a run's monitor trace."""

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("criteria_steps", ROOT / "bench" / "criteria_steps.py")
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)


def test_analyse_applies_sats_rule_to_every_layer():
    skew = {1: [0.5, 0.1], 2: [2.0, 0.5], 3: [2.0, 1.8], 4: [2.5, 2.0], 5: [2.6, 1.9], 6: [2.7, 2.2]}
    drift = {1: [None, None], 2: [None, None], 3: [0.5, 3.0], 4: [1.0, 1.2], 5: [9.0, 0.1], 6: [0.2, 0.3]}
    r = cs.analyse(skew, drift, 1.7, 1.3, [5, 7])
    assert r["first_skewed"] == 3 and r["hits"] == [4, 6]
    assert r["drift_share"] == [3 / 4, 3 / 4] and r["joint_share"] == 2 / 4
    assert r["before"] == {5: True, 7: True}
    assert cs.analyse(skew, drift, 1.7, 1.3, [4])["before"] == {4: False}  # a hit at the backstop is not before it
    never = cs.analyse(skew, drift, 3.0, 1.3, [])
    assert never["first_skewed"] is None and never["hits"] == [] and never["joint_share"] is None


def test_read_trace_takes_the_logged_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "r.tensorboard"))
    for step, (s0, s1, d0, d1) in enumerate([(0.5, 0.2, None, None), (1.8, 1.9, 4.0, 2.0), (2.0, 2.1, 1.0, 0.5)],
                                            start=1):
        w.add_scalar("monitor/skewness/layer0", s0, step)
        w.add_scalar("monitor/skewness/layer1", s1, step)
        if d0 is not None:
            w.add_scalar("monitor/drift/layer0", d0, step)
            w.add_scalar("monitor/drift/layer1", d1, step)
    w.close()
    skew, drift = cs.read_trace(tmp_path / "r.tensorboard")
    assert sorted(skew) == [1, 2, 3] and drift[1] == [None, None] and drift[3] == [1.0, 0.5]
    assert cs.analyse(skew, drift, 1.7, 1.3, [])["hits"] == [3]
