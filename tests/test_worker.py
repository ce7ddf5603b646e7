"""The site worker (client/worker.py): a warm round equals a cold one, and only bundles whose client
code is this installation's (or whose hash the site trusts) are served."""

from __future__ import annotations

import hashlib

import pytest
import torch

import client.app as site_app
from client.worker import BundleRefused, WorkerConflict, check_bundle, hold_state_dir
from server.bundle import stage_app


def _conf(rnd: int, run_key: str = "run") -> dict:
    return {"strategy": "fedavg", "server-round": rnd, "local-steps": 3, "total-steps": 9, "wire-dtype": "bf16",
            "run-key": run_key, "overrides": "model=micro data.batch_size=4 data.sim_profiles=[press_ge]"}


def _rounds(tmp_path, cold: bool) -> list[dict]:
    """Three rounds of one site, each from the previous round's weights (as if FedAvg of one site)."""
    node = {"site": "einstein", "state-dir": str(tmp_path / "state"), "device": "cpu", "overrides": ""}
    site_app._SESSION = None
    out, weights = [], None
    for rnd in (1, 2, 3):
        if cold:  # what an ephemeral ClientApp process sees: nothing in memory, the state on disk
            site_app._SESSION = None
        state, metrics = site_app.local_round(
            _conf(rnd), node, lambda t, w=weights: {k: v.clone() for k, v in (w or t).items()})
        weights = {k: v.detach().clone() for k, v in state.items()}
        out.append(weights)
        assert metrics["build-seconds"] > 0 if (cold or rnd == 1) else metrics["build-seconds"] == 0
    return out


def test_a_warm_round_gives_the_same_weights_as_a_cold_one(tmp_path):
    warm = _rounds(tmp_path / "warm", cold=False)
    cold = _rounds(tmp_path / "cold", cold=True)
    for w, c in zip(warm, cold):
        assert w.keys() == c.keys()
        assert all(torch.equal(w[k], c[k]) for k in w)
    assert not torch.equal(warm[0]["blocks.0.attn.qkv.weight"], warm[2]["blocks.0.attn.qkv.weight"])  # it trained


def test_a_new_run_key_builds_a_new_session(tmp_path):
    node = {"site": "einstein", "state-dir": str(tmp_path), "device": "cpu", "overrides": ""}
    site_app._SESSION = None
    site_app.local_round(_conf(1, "a"), node, lambda t: t)
    first = site_app._SESSION
    site_app.local_round(_conf(1, "b"), node, lambda t: t)
    assert site_app._SESSION is not first and site_app._SESSION.state == tmp_path / "b"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The app bundle (FAB bytes) as `flwr run` builds it from this installation, and its folder."""
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(tmp_path_factory.mktemp("bundle"))
    return app, build_fab_from_disk(app)


def test_the_installed_bundle_is_served(bundle):
    _, fab = bundle
    assert check_bundle(fab) == hashlib.sha256(fab).hexdigest()


def test_a_bundle_with_changed_client_code_is_refused_naming_the_file(bundle, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app, _ = bundle
    (app / "client" / "app.py").write_text((app / "client" / "app.py").read_text() + "\nimport os  # exfiltrate\n")
    try:
        fab = build_fab_from_disk(app)
    finally:
        stage_app(app.parents[1])  # restore the module's fixture
    digest = hashlib.sha256(fab).hexdigest()
    with pytest.raises(BundleRefused, match=r"client/app\.py differs from this site's installed copy") as err:
        check_bundle(fab)
    assert digest in str(err.value)  # what the admin would add to site.trusted_apps
    assert check_bundle(fab, trusted=[digest]) == digest  # ... and then it is served


def test_a_bundle_with_an_extra_client_module_or_not_a_zip_is_refused(bundle):
    from flwr.cli.build import build_fab_from_disk

    app, _ = bundle
    (app / "client" / "extra.py").write_text("print('hello')\n")
    try:
        fab = build_fab_from_disk(app)
    finally:
        (app / "client" / "extra.py").unlink()
    with pytest.raises(BundleRefused, match=r"client/extra\.py is not in this installation"):
        check_bundle(fab)
    with pytest.raises(BundleRefused, match="not a zip archive"):
        check_bundle(b"not a zip")


def test_a_second_worker_for_the_same_state_folder_is_refused_naming_the_first(tmp_path):
    import os

    first = hold_state_dir(tmp_path / "state")
    with pytest.raises(WorkerConflict, match=rf"another site worker \(pid {os.getpid()}\) already serves"):
        hold_state_dir(tmp_path / "state")
    first.close()  # the first one exits: the folder is free again
    hold_state_dir(tmp_path / "state").close()


def test_a_round_done_again_after_a_server_restart_equals_a_fresh_process(tmp_path):
    node = {"site": "einstein", "state-dir": str(tmp_path / "state"), "device": "cpu", "overrides": ""}
    site_app._SESSION = None
    for rnd in (1, 2):  # the site finished rounds 1 and 2; the server died before committing them
        site_app.local_round(_conf(rnd), node, lambda t: t)
    warm, _ = site_app.local_round(_conf(1), node, lambda t: t)  # the resumed run asks for round 1 again
    warm = {k: v.detach().clone() for k, v in warm.items()}
    site_app._SESSION = None
    cold, _ = site_app.local_round(_conf(1), node, lambda t: t)
    assert all(torch.equal(warm[k], cold[k]) for k in warm)
