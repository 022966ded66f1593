"""The MNIST preset of ``fewflow bench fewstep``: its own tables, a UNet with an OT teacher, its claims.

(The full run needs MNIST, fetched explicitly; CI has no network, so this checks the wiring and the claim
arithmetic on a hand-made result.)"""

from __future__ import annotations

import math

import torch

from fewflow.bench.common import BenchData, UNetSpec, make_net
from fewflow.bench.fewstep import FewstepConfig, check_claims, config_from_args


def test_mnist_alone_writes_its_own_tables_with_a_unet_and_an_ot_teacher(tmp_path):
    cfg = config_from_args(["--full", "--datasets", "mnist", "--cache", str(tmp_path)])
    assert cfg.stem == "fewstep_mnist" and cfg.nfe == (1, 2, 4)
    p = cfg.preset("mnist")
    assert isinstance(p.net, UNetSpec) and p.teacher_coupling == "ot" and p.teacher_ref_steps == 100
    assert FewstepConfig(mode="full").stem == "fewstep"
    assert not isinstance(FewstepConfig(mode="full").preset("digits").net, UNetSpec)


def test_unet_spec_builds_a_unet_and_its_flow_map():
    img, lab = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    data = BenchData("mnist", "image", img, lab, 10, None, img, lab, img)
    net = make_net(data, UNetSpec(base=8, mults=(1, 2)))
    assert type(net).__name__ == "UNet" and not net.is_flow_map
    fm = make_net(data, UNetSpec(base=8, mults=(1, 2)), flow_map=True)
    x = torch.randn(3, 1, 28, 28)
    t = torch.rand(3)
    assert fm.is_flow_map and fm(x, t, t, y=torch.zeros(3, dtype=torch.long)).shape == x.shape


def test_mnist_claims_use_their_thresholds():
    def metrics(v1, v2):
        return {"1": {"fd": v1}, "2": {"fd": v2}}

    result = {"mnist": {"metric": "fd", "kind": "image",
                        "teacher": {"metrics": {"1": {"fd": 12.0}, "2": {"fd": 2.0}, "100": {"fd": 1.0}}},
                        "methods": {"meanflow": {"metrics": metrics(1.9, 1.6)},
                                    "reflow": {"metrics": metrics(3.9, 1.4)}}}}
    claims = {c["claim"]: c for c in check_claims(result)}
    assert claims["best method at 1 NFE within 2x of teacher@100"]["met"]  # 1.9 <= 2.0
    assert claims["best method at 2 NFE within 1.5x of teacher@100"]["met"]  # 1.4 <= 1.5
    assert claims["every method at 1 NFE beats teacher 1-step Euler by >= 3x"]["met"]  # 3.9 <= 4.0
    result["mnist"]["methods"]["reflow"]["metrics"]["1"]["fd"] = 4.1
    claims = {c["claim"]: c for c in check_claims(result)}
    assert not claims["every method at 1 NFE beats teacher 1-step Euler by >= 3x"]["met"]
    best = claims["best method at 1 NFE within 2x of teacher@100"]["value"]
    assert math.isclose(float(best.split()[1]), 1.9)
