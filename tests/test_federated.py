"""Federated training (issue 17): the sites' split, federated statistics, what goes over the
wire (every message the server's strategy receives, inspected), TLS, DP at the sites."""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from encoders.modality import Modality
from fusion.config import ModelConfig
from fusion.modelfile import load_model
from fusion.train import fit_telemetry_stats
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.learn.dataset import LabelledWindow, recording_windows
from pipeline.learn.federated.federation import Federation, ServerOptions, weighted_average
from pipeline.learn.federated.protocol import SiteRecipe
from pipeline.learn.federated.server import run_server
from pipeline.learn.federated.simulate import SimulateOptions, SiteProcesses, free_port, simulate
from pipeline.learn.federated.site import Site, SiteOptions
from pipeline.learn.federated.split import scan, split_recordings
from pipeline.learn.federated.stats import combine, site_stats
from pipeline.learn.privacy import DPOptions
from pipeline.learn.training import split_windows
from pipeline.recordings.file import read_records
from pipeline.settings import Settings
from pipeline.stream.features import FeatureSpec
from pipeline.stream.model_runner import ModelRunner
from tests.factory import T0, make_model


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fed") / "tiny.iotrec"
    args = ["simulate", "--seed", "11", "--devices", "4", "--duration", "20", "--out", str(path)]
    assert main(args) == 0
    return path


def recording_strategy(inner: Any) -> Any:
    """A Flower strategy around ours that keeps every reply the server receives."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class Recording(Strategy):
        def __init__(self) -> None:
            self.fits: list[tuple[int, list[np.ndarray], int, dict[str, Any], int]] = []
            self.evaluations: list[tuple[int, int, dict[str, Any]]] = []
            self.failures: list[Any] = []

        def initialize_parameters(self, client_manager: Any) -> Any:
            return inner.initialize_parameters(client_manager)

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            return inner.configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            for _, res in results:
                size = sum(len(t) for t in res.parameters.tensors)
                arrays = parameters_to_ndarrays(res.parameters)
                self.fits.append((server_round, arrays, res.num_examples, dict(res.metrics), size))
            self.failures += failures
            return inner.aggregate_fit(server_round, results, failures)

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            return inner.configure_evaluate(server_round, parameters, client_manager)

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            for _, res in results:
                self.evaluations.append((server_round, res.num_examples, dict(res.metrics)))
            self.failures += failures
            return inner.aggregate_evaluate(server_round, results, failures)

        def evaluate(self, server_round: int, parameters: Any) -> Any:
            return inner.evaluate(server_round, parameters)

    return Recording()


def site_training_windows(path: Path, config: ModelConfig) -> list[LabelledWindow]:
    """A site's training windows, as the site itself splits them (SiteOptions defaults)."""
    per_file = recording_windows([path], Settings(), FeatureSpec.from_model_config(config))
    train, _ = split_windows(per_file[0], 0.2, 30_000, [0] * len(per_file[0]))
    return train


def test_sites_get_whole_devices_or_whole_labelled_spans(recording: Path, tmp_path: Path) -> None:
    settings = Settings()
    total = sum(1 for _ in read_records(recording))
    by_device = split_recordings([recording], 3, "by-device", tmp_path / "d", settings)
    devices = [set(scan(p, settings.topics.labels)[0]) for p in by_device]
    assert sum(len(d) for d in devices) == 4 and not set.intersection(*devices)
    assert sum(sum(1 for _ in read_records(p)) for p in by_device) == total

    skew = split_recordings([recording], 3, "by-class-skew", tmp_path / "s", settings)
    assert sum(sum(1 for _ in read_records(p)) for p in skew) == total  # every record, once
    mixes = []
    for path in skew:
        _, spans = scan(path, settings.topics.labels)
        inputs = [r for r in read_records(path) if r.topic != settings.topics.labels]
        for r in inputs:  # every input record lies in a span this site holds
            got = spans[r.key.decode()]  # type: ignore[union-attr]
            assert any(s <= r.timestamp_ms < e for s, e, _ in got)
        mixes.append(Counter(label for got in spans.values() for *_, label in got))
    shares = [{c: n / sum(m.values()) for c, n in m.items()} for m in mixes]
    assert shares[0] != shares[1] != shares[2]  # a skewed class mix per site
    again = split_recordings([recording], 3, "by-class-skew", tmp_path / "s2", settings)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in skew]  # deterministic


def test_statistics_from_site_sums_equal_the_central_fit() -> None:
    rng = np.random.default_rng(0)

    def window(i: int) -> LabelledWindow:
        x = rng.normal(30.0, 4.0, (20, 3)).astype(np.float32)
        x[rng.random(x.shape) < 0.3] = np.nan
        return LabelledWindow("d", T0 + i, {Modality.TELEMETRY: x}, ["fire", "normal"][i % 2])

    windows = [window(i) for i in range(30)]
    replies = [site_stats(windows[:7], 3), site_stats(windows[7:], 3)]
    combined = combine(replies, 3)
    mean, std = fit_telemetry_stats((w.inputs for w in windows), 3)
    np.testing.assert_allclose(combined.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(combined.std, std, rtol=1e-9)
    assert combined.labels == {"fire": 15, "normal": 15} and combined.windows == 30
    assert set(replies[0]) == {"windows", "count", "sum", "sumsq", "labels"}


def test_a_site_that_requires_dp_trains_with_it_whatever_the_server_asks() -> None:
    options = SiteOptions(server="h:1", data=(Path("x"),), dp=DPOptions(epsilon=2.0))
    site = Site(options, Settings())
    alone = site.privacy_for(SiteRecipe())  # the server asks for no DP
    assert alone is not None and alone.epsilon == 2.0
    asked = SiteRecipe(dp_epsilon=8.0, dp_delta=1e-5)
    got = site.privacy_for(asked)
    assert got is not None and got.epsilon == 2.0  # the site's own ceiling wins
    plain = Site(SiteOptions(server="h:1", data=(Path("x"),)), Settings())
    assert plain.privacy_for(SiteRecipe()) is None
    server = plain.privacy_for(asked)
    assert server is not None and server.epsilon == 8.0


@pytest.mark.slow
def test_federate_simulate_sends_only_weights_and_aggregates(
    recording: Path, tmp_path: Path
) -> None:
    settings = Settings()
    out = tmp_path / "fed"
    options = SimulateOptions(
        server=ServerOptions(rounds=2, min_sites=3, out=out / "model", recipe=SiteRecipe(seed=1)),
        sites=3,
        data=(recording,),
        split="by-class-skew",
    )
    wire: list[Any] = []

    def wrap(strategy: Any) -> Any:
        wire.append(recording_strategy(strategy))
        return wire[0]

    summary = simulate(options, settings, None, wrap)
    got = wire[0]
    assert got.failures == []
    assert ModelRunner.load(out / "model", "cpu").version == summary.version  # `iotfuse run`
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    model = load_model(out / "model")
    state = model.model.state_dict()
    shapes = [tuple(v.shape) for v in state.values()]
    weights_bytes = sum(v.numel() * v.element_size() for v in state.values())
    sites = sorted((out / "sites").glob("site-*.iotrec"))
    expected = {p.stem: site_stats(site_training_windows(p, model.config), 5) for p in sites}

    stats = [f for f in got.fits if f[0] == 1]
    assert len(stats) == 3 and len(got.fits) == 9
    for _, arrays, n, metrics, size in stats:  # round 1: aggregates, exactly, and no arrays
        assert arrays == [] and size == 0
        site = metrics.pop("site")
        assert metrics == expected[site] and n == metrics["windows"]
    for server_round, arrays, _, metrics, size in got.fits:
        if server_round == 1:
            continue
        assert [a.shape for a in arrays] == shapes  # the model's weights, nothing more
        assert size <= weights_bytes + 128 * len(shapes)  # plus each array's .npy header
        assert set(metrics) == {"site", "train_loss"} and isinstance(metrics["train_loss"], float)
    n_classes = len(model.config.classes)
    assert len(got.evaluations) == 6
    for _, n, metrics in got.evaluations:
        assert set(metrics) == {"loss_sum", "cm"}
        cm = np.asarray(json.loads(metrics["cm"]))
        assert cm.shape == (n_classes, n_classes) and cm.dtype.kind == "i" and cm.sum() == n

    # the normalisation is the central fit over every site's training windows
    tel = model.config.telemetry
    assert tel is not None
    all_train = [w for p in sites for w in site_training_windows(p, model.config)]
    mean, std = fit_telemetry_stats((w.inputs for w in all_train), 5)
    np.testing.assert_allclose(tel.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(tel.std, std, rtol=1e-9)
    report = json.loads((out / "federation.json").read_text())
    assert report["best_round"] == summary.best_round and len(report["rounds"]) == 2
    assert sorted(report["sites"]) == ["site-0", "site-1", "site-2"]


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate it signed for 127.0.0.1/localhost (PEM)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("iotfuse test CA"))
        .issuer_name(name("iotfuse test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(alt, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.slow
def test_a_dp_federation_fine_tunes_a_batchnorm_model_with_its_statistics_frozen(
    recording: Path, tmp_path: Path
) -> None:
    from fusion.model import FusionClassifier
    from fusion.modelfile import save_model
    from pipeline.simulate import CLASSES as SIMULATED

    tiny = load_model(make_model(tmp_path / "tiny")).config
    torch.manual_seed(0)  # BatchNorm, as the shipped model; the recording's classes
    init = tmp_path / "init"
    save_model(FusionClassifier(dataclasses.replace(tiny, classes=tuple(SIMULATED))), init)
    port = free_port()
    command = [
        sys.executable, "-m", "pipeline.cli", "federate", "site", "--server", f"localhost:{port}",
        "--data", str(recording), "--name", "plant-1", "--device", "cpu",
        "--set", "runtime.torch_threads=1",
    ]  # fmt: skip
    site = SiteProcesses([command], [tmp_path / "site.log"], port)
    options = ServerOptions(
        rounds=1,
        min_sites=1,
        out=tmp_path / "model",
        init=init,
        name="plant-model",
        address=f"127.0.0.1:{port}",
        dp=DPOptions(epsilon=5.0, delta=1e-4),
        wait_s=120,
    )
    site.thread.start()
    try:
        run_server(options, Settings(), None, abort=site.failure)
    finally:
        codes = site.stop()
    log = (tmp_path / "site.log").read_text()
    assert codes == [0], log
    assert "statistics stay" in log and "AdamW at lr 0.0005" in log and "epsilon spent" in log
    start, tuned = load_model(init), load_model(tmp_path / "model")
    assert tuned.config.conv_norm == "batch" and tuned.config.privacy is not None
    assert tuned.config.privacy.init_version == start.version
    assert tuned.config.name == "plant-model"
    before, after = start.model.state_dict(), tuned.model.state_dict()
    for key in before:  # statistics as they were; the rest trained
        assert torch.equal(after[key], before[key]) == ("running" in key or "batches" in key), key


@pytest.mark.slow
def test_a_site_joins_over_tls_and_trains_with_dp(recording: Path, tmp_path: Path) -> None:
    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    command = [
        "python", "-m", "pipeline.cli", "federate", "site", "--server", f"localhost:{port}",
        "--data", str(recording), "--name", "tls-site", "--tls-ca", str(ca), "--device", "cpu",
        "--set", "runtime.torch_threads=1",
    ]  # fmt: skip
    command[0] = sys.executable
    site = SiteProcesses([command], [tmp_path / "site.log"], port)
    options = ServerOptions(
        rounds=1,
        min_sites=1,
        out=tmp_path / "model",
        address=f"127.0.0.1:{port}",
        tls=(ca, cert, key),
        dp=DPOptions(epsilon=5.0, delta=1e-4),
        wait_s=120,
    )
    site.thread.start()
    try:
        summary = run_server(options, Settings(), None, abort=site.failure)
    finally:
        codes = site.stop()
    log = (tmp_path / "site.log").read_text()
    assert codes == [0], log
    assert "joining" in log and "(TLS)" in log and "epsilon spent" in log
    config = load_model(tmp_path / "model").config
    assert config.conv_norm == "group" and config.privacy is not None
    assert config.privacy.scope == "per-site" and 0 < config.privacy.epsilon <= 5.0
    assert summary.epsilon == config.privacy.epsilon and summary.sites == ["tls-site"]


def test_the_server_stops_with_the_reason_when_sites_do_not_come(tmp_path: Path) -> None:
    options = ServerOptions(
        rounds=1, min_sites=2, out=tmp_path / "m", address=f"127.0.0.1:{free_port()}", wait_s=1
    )
    with pytest.raises(UserError, match="0 of the 2 site"):
        run_server(options, Settings())
    options = ServerOptions(rounds=1, min_sites=1, out=tmp_path / "m2", address=options.address)
    with pytest.raises(UserError, match="site-3 exited"):  # simulate's watch on its sites
        run_server(options, Settings(), abort=lambda: "site-3 exited with code 1")


def test_init_starts_from_its_model_and_unfit_replies_are_left_out(tmp_path: Path) -> None:
    init = make_model(tmp_path / "init")  # classes normal, fire, intrusion; 3 metrics
    options = ServerOptions(rounds=1, min_sites=1, out=tmp_path / "m", init=init)
    fed = Federation(options, None)
    reply = {"site": "a", **site_stats([LabelledWindow("d", T0, {}, "fire")], 3)}
    broken = {**reply, "site": "b", "count": "[1, 2]"}  # 2 counts for 3 metrics
    arrays = fed.first_weights([reply, broken])
    loaded = load_model(init)
    assert fed.config == loaded.config and fed.sites == ["a"]
    for got, want in zip(arrays, loaded.model.state_dict().values(), strict=True):
        np.testing.assert_array_equal(got, want.numpy())
    fed.current = arrays
    poisoned = [a.copy() for a in arrays]
    poisoned[0][...] = np.nan
    replies = [
        (arrays, 2, {"site": "a", "train_loss": 0.5}),
        (poisoned, 5, {"site": "b", "train_loss": 0.1}),  # a diverged or hostile site
        (arrays[:-1], 5, {"site": "c", "train_loss": 0.1}),  # not the model's weights
        (arrays, 1, {"site": "d", "train_loss": "high", "epsilon": "x"}),  # not numbers
    ]
    averaged = fed.average(replies)
    assert all(np.array_equal(a, b) for a, b in zip(averaged, arrays, strict=True))
    assert fed.round_loss == 0.5 and fed.privacy is None  # d's loss is not a number
    unknown = {"site": "c", **site_stats([LabelledWindow("d", T0, {}, "smoke")], 3)}
    with pytest.raises(UserError, match="does not know"):
        fed.first_weights([unknown])


def test_federated_averaging_weighs_sites_by_their_windows() -> None:
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array(10, dtype=np.int64)]
    b = [np.array([4.0, 8.0], dtype=np.float32), np.array(13, dtype=np.int64)]
    got = weighted_average([(a, 1), (b, 2)])
    np.testing.assert_allclose(got[0], [3.0, 6.0])
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and int(got[1]) == 12


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_a_new_federated_model_has_the_cnn_norm_asked_for(tmp_path: Path, norm: str) -> None:
    """--conv-norm group: no BatchNorm statistics to average over sites of skewed classes."""
    options = ServerOptions(rounds=1, min_sites=1, out=tmp_path / "m", conv_norm=norm)
    fed = Federation(options, None)
    metrics = len(fed.untrained.telemetry.metrics)
    fed.first_weights([{"site": "a", **site_stats([LabelledWindow("d", T0, {}, "fire")], metrics)}])
    assert fed.config.conv_norm == norm


def test_a_federation_from_a_dp_model_claims_only_its_own_budget(tmp_path: Path) -> None:
    init = make_model(tmp_path / "init")
    config = json.loads((init / "config.json").read_text())
    config["privacy"] = {  # a model trained with DP elsewhere, on other data
        "epsilon": 1.0,
        "delta": 1e-5,
        "target_epsilon": 1.0,
        "noise_multiplier": 5.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
    }
    (init / "config.json").write_text(json.dumps(config))
    loaded = load_model(init)
    assert loaded.config.privacy is not None
    plain = Federation(ServerOptions(rounds=1, min_sites=1, out=tmp_path / "m", init=init), None)
    reply = {"site": "a", **site_stats([LabelledWindow("d", T0, {}, "fire")], 3)}
    arrays = plain.first_weights([reply])
    assert plain.config.privacy is None  # trained without DP: no budget claimed
    dp = ServerOptions(
        rounds=1, min_sites=1, out=tmp_path / "m2", init=init, dp=DPOptions(epsilon=8.0)
    )
    private = Federation(dp, None)
    private.current = private.first_weights([reply])
    private.average([(arrays, 2, {"site": "a", "train_loss": 0.5, "epsilon": 7.5})])
    assert private.privacy.epsilon == 7.5 and private.privacy.init_version == loaded.version
