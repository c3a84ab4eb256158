import json
from pathlib import Path

import pytest

from specgate.settings import AllowedCaller, Destination, Settings, SettingsError


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    s = Settings.load()
    assert s.data_dir == Path("./specgate-data")
    assert s.scp_ae_title == "SPECGATE" and s.scp_host == "127.0.0.1" and s.scp_port == 11112
    assert s.allowed_callers == [] and s.destinations == []
    assert s.study_quiet_seconds == 60
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("specgate-data/specgate.db")
    assert s.broker_url is None
    assert [r.name for r in s.rules] == ["default-ct-mr"]
    assert s.rules[0].modalities == ("CT", "MR") and s.rules[0].min_slices == 16


def test_environment_lists_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECGATE_ALLOWED_CALLERS", "PACS@10.0.0.5, MODALITY@*")
    monkeypatch.setenv("SPECGATE_DESTINATIONS", "pacs=ORTHANC@pacs.example.org:4242,archive=ARCH@127.0.0.1:104")
    monkeypatch.setenv("SPECGATE_SCP_PORT", "11113")
    s = Settings.load()
    assert s.allowed_callers == [AllowedCaller(ae_title="PACS", host="10.0.0.5"),
                                 AllowedCaller(ae_title="MODALITY", host="*")]
    assert s.allowed_callers[1].matches("MODALITY", "192.0.2.1")
    assert not s.allowed_callers[0].matches("PACS", "10.0.0.6")
    assert s.destination("archive") == Destination(name="archive", ae_title="ARCH", host="127.0.0.1", port=104)
    assert s.scp_port == 11113


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("SPECGATE_SCP_PORT", "70000", "SPECGATE_SCP_PORT"),
        ("SPECGATE_SCP_PORT", "http", "SPECGATE_SCP_PORT"),
        ("SPECGATE_SCP_AE_TITLE", "WAY_TOO_LONG_AE_TITLE", "SPECGATE_SCP_AE_TITLE"),
        ("SPECGATE_SCP_AE_TITLE", "BAD\\AE", "SPECGATE_SCP_AE_TITLE"),
        ("SPECGATE_ALLOWED_CALLERS", "NOHOST", "SPECGATE_ALLOWED_CALLERS"),
        ("SPECGATE_DESTINATIONS", "pacs=ORTHANC@host", "SPECGATE_DESTINATIONS"),
        ("SPECGATE_DESTINATIONS", "a=X@h:1,a=Y@h:2", "destination names must be unique"),
        ("SPECGATE_DATABASE_URL", "mysql://x/y", "SPECGATE_DATABASE_URL"),
        ("SPECGATE_STUDY_QUIET_SECONDS", "0", "SPECGATE_STUDY_QUIET_SECONDS"),
        ("SPECGATE_DESTINATION", "pacs=ORTHANC@h:1", "SPECGATE_DESTINATION"),
        ("SPECGATE_INFERENCE_SPACING", "CT=4,0,4", "SPECGATE_INFERENCE_SPACING"),
        ("SPECGATE_INFERENCE_SPACING", "CT:4,4,4", "MODALITY=z,y,x"),
        ("SPECGATE_SCP_MAX_PDU", "0", "SPECGATE_SCP_MAX_PDU"),  # "unlimited" is no longer a PDU length
        ("SPECGATE_SCP_MAX_INSTANCE_BYTES", "1000", "SPECGATE_SCP_MAX_INSTANCE_BYTES"),
        ("SPECGATE_SCP_MAX_SEQUENCE_DEPTH", "0", "SPECGATE_SCP_MAX_SEQUENCE_DEPTH"),
        ("SPECGATE_SCP_MAX_ASSOCIATION_BYTES", "1048576", "could not carry one instance"),
        ("SPECGATE_WORKER_TORCH_THREADS", "-1", "SPECGATE_WORKER_TORCH_THREADS"),
        ("SPECGATE_WORKER_TORCH_THREADS", "two", "SPECGATE_WORKER_TORCH_THREADS"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                                    needle: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as exc:
        Settings.load()
    assert needle in str(exc.value)


def test_inference_spacing_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().inference_spacing_pairs is None  # the weights' own
    monkeypatch.setenv("SPECGATE_INFERENCE_SPACING", "native")
    assert Settings.load().inference_spacing_pairs == ()
    monkeypatch.setenv("SPECGATE_INFERENCE_SPACING", "mr=3,1.5,1.5; CT=5,4,4")
    assert Settings.load().inference_spacing_pairs == (("CT", (5.0, 4.0, 4.0)), ("MR", (3.0, 1.5, 1.5)))


def test_toml_file_is_read_and_environment_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "specgate.toml"
    cfg.write_text(
        'scp_port = 4000\nstudy_quiet_seconds = 5\n'
        '[[rules]]\nname = "brain-mr"\nmodalities = ["MR"]\nseries_description = "T1"\nmin_slices = 20\n'
    )
    monkeypatch.setenv("SPECGATE_SCP_PORT", "4001")
    s = Settings.load(cfg)
    assert s.scp_port == 4001 and s.study_quiet_seconds == 5
    assert len(s.rules) == 1 and s.rules[0].name == "brain-mr" and s.rules[0].modalities == ("MR",)


def test_toml_unknown_key_and_bad_regex_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("scp_prot = 4000\n")
    with pytest.raises(SettingsError, match="scp_prot"):
        Settings.load(cfg)
    cfg.write_text('[[rules]]\nname = "x"\nseries_description = "(unclosed"\n')
    with pytest.raises(SettingsError, match="does not compile"):
        Settings.load(cfg)
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(tmp_path / "missing.toml")


def test_tls_settings_must_be_consistent(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="together"):
        Settings.load(scp_tls_cert=tmp_path / "c.pem")
    with pytest.raises(SettingsError, match="needs"):
        Settings.load(scp_tls_require_client_cert=True)


def test_named_models_are_read_and_rules_may_name_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text("""model_weights = "/models/main.pt"
[models.brain]
weights = "/models/brain.pt"
bank = "/models/brain-bank.npz"
[[rules]]
name = "brain-mr"
model = "brain"
[[rules]]
name = "any-ct"
""")
    models = Settings.load(cfg).worker_config().models
    assert [(m.name, m.weights, m.bank) for m in models] == [
        ("default", Path("/models/main.pt"), None), ("brain", Path("/models/brain.pt"), Path("/models/brain-bank.npz"))]
    # a rule may name a model the ledger has registered, which the settings cannot see: whether it exists
    # (and has a bank) is checked when the worker or the SCP starts (tests/integration/test_model_registry.py)
    cfg.write_text('[[rules]]\nname = "brain-mr"\nmodel = "brian"\n')
    assert [r.model for r in Settings.load(cfg).rules] == ["brian"]
    # "default" is model_weights / model_bank, never a second definition; its table only describes its segment
    monkeypatch.setenv("SPECGATE_MODELS", '{"default": {"weights": "/a.pt", "bank": "/a.npz"}}')
    with pytest.raises(SettingsError, match="models.default cannot set weights or bank"):
        Settings.load()
    monkeypatch.setenv("SPECGATE_MODELS", '{"brain": {"weights": "/a.pt"}}')
    with pytest.raises(SettingsError, match=r"models.brain \(SPECGATE_MODELS, TOML \[models.brain\]\) needs weights and bank"):
        Settings.load()


def test_a_models_table_describes_its_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    """segment_label, segment_description, codes and display_color of [models.NAME] reach the worker's
    ModelSpec; left out, they are the shipped model's phantom description; nonsense is refused naming it."""
    from worker.segments import PHANTOM_SEGMENT

    assert Settings().worker_config().models[0].segment == PHANTOM_SEGMENT  # no table: the shipped model's
    monkeypatch.setenv("SPECGATE_MODELS", json.dumps({
        "liver": {"weights": "/l.pt", "bank": "/l.npz", "segment_label": "Liver", "display_color": [10, 20, 30],
                  "type_code": ["10200004", "SCT", "Liver"]},
        "plain": {"weights": "/p.pt", "bank": "/p.npz"},
        "default": {"segment_description": "Shipped phantom model"}}))
    specs = {m.name: m for m in Settings.load().worker_config().models}
    assert specs["liver"].segment is not None
    assert (specs["liver"].segment.label, specs["liver"].segment.color, specs["liver"].segment.description) == (
        "Liver", (10, 20, 30), None)
    assert specs["liver"].segment.code.type == ("10200004", "SCT", "Liver")
    assert specs["liver"].segment.code.category == PHANTOM_SEGMENT.code.category
    assert specs["plain"].segment == PHANTOM_SEGMENT
    assert specs["default"].segment is not None and specs["default"].segment.label == "Phantom organ"
    assert specs["default"].segment.description == "Shipped phantom model"
    for bad, needle in [({"display_color": [0, 0, 256]}, "display_color"), ({"type_code": ["1", "SCT", ""]}, "type_code"),
                        ({"segment_label": "a\\b"}, "segment label"), ({"segment_colour": [1, 2, 3]}, "segment_colour")]:
        monkeypatch.setenv("SPECGATE_MODELS", json.dumps({"m": {"weights": "/m.pt", "bank": "/m.npz", **bad}}))
        with pytest.raises(SettingsError, match=needle):
            Settings.load()


def test_receive_limits_have_their_documented_defaults_and_reach_the_node(tmp_path: Path) -> None:
    node = Settings.load(data_dir=tmp_path).node_config()
    assert node.max_pdu == 1 << 20 and node.accept_deflated is False
    limits = node.limits
    assert (limits.command_bytes, limits.element_bytes, limits.instance_bytes, limits.association_bytes,
            limits.sequence_depth, limits.inflated_bytes) == (64 << 10, 64 << 20, 2 << 30, 64 << 30, 32, 256 << 20)
    node = Settings.load(data_dir=tmp_path, scp_max_pdu=16384, scp_max_command_bytes=4096,
                         scp_max_element_bytes=1 << 20, scp_max_instance_bytes=8 << 20,
                         scp_max_association_bytes=16 << 20, scp_max_sequence_depth=4, scp_accept_deflated=True,
                         scp_max_inflated_bytes=2 << 20).node_config()
    assert node.max_pdu == 16384 and node.accept_deflated is True
    assert (node.limits.command_bytes, node.limits.element_bytes, node.limits.instance_bytes,
            node.limits.association_bytes, node.limits.sequence_depth, node.limits.inflated_bytes) == \
        (4096, 1 << 20, 8 << 20, 16 << 20, 4, 2 << 20)


def test_worker_config_carries_what_the_worker_needs(tmp_path: Path) -> None:
    s = Settings.load(data_dir=tmp_path, destinations="pacs=ORTHANC@127.0.0.1:4242", scu_max_attempts=2,
                      inference_spacing="CT=4,4,4", worker_stale_seconds=90, installation_id="SITE-1")
    w = s.worker_config()
    assert w.database_url == s.db_url and w.broker_url is None and w.broker_dir == tmp_path / "broker"
    assert w.pipeline.results_dir == s.results_dir and w.pipeline.installation == "SITE-1"
    assert w.pipeline.stale_after_s == 90 and w.pipeline.rule("default-ct-mr") == s.rules[0]
    assert w.inference.spacing == (("CT", (4.0, 4.0, 4.0)),)
    assert w.delivery.destinations == (s.destination("pacs"),) and w.delivery.retry.max_attempts == 2
    assert w.torch_threads == 0  # torch decides
    assert Settings.load(data_dir=tmp_path, worker_torch_threads=2).worker_config().torch_threads == 2


def test_cli_refuses_bad_settings_naming_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from specgate.cli import main

    result = CliRunner().invoke(main, ["jobs", "list"], env={"SPECGATE_SCP_PORT": "0"})
    assert result.exit_code == 2
    assert "SPECGATE_SCP_PORT" in result.output


def test_the_example_deployment_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "specgate.example.toml"
    s = Settings.load(example)
    assert s.database_url and s.database_url.startswith("postgresql+psycopg://")
    assert [str(c) for c in s.allowed_callers] == ["PACS_MAIN@10.1.2.3", "CT_SCANNER_1@10.1.5.20"]
    assert s.destination("pacs").port == 104
    assert [r.name for r in s.rules] == ["abdomen-ct", "any-ct-mr"]
    assert s.rules[0].model == "liver-v3"
    (liver,) = [m for m in s.worker_config().models if m.name == "liver-v3"]
    assert liver.segment is not None and liver.segment.label == "Liver"
    assert liver.segment.code.type == ("10200004", "SCT", "Liver")


def test_the_visibility_timeout_must_outlast_every_hard_time_limit_with_margin(tmp_path: Path) -> None:
    """Redis hands a message that is not acknowledged to another worker after the visibility timeout; a
    task is killed at its hard time limit. Start-up refuses a visibility timeout that does not outlast the
    longest hard limit by the margin, naming both values; the Celery app runs with the limits checked."""
    from click.testing import CliRunner

    from specgate.cli import main
    from worker.celery_app import DELIVER_TASK, SEGMENT_TASK, make_celery
    from worker.config import VISIBILITY_MARGIN_S

    limits = Settings.load(data_dir=tmp_path).worker_config().limits
    assert (limits.segment_soft_s, limits.segment_hard_s, limits.visibility_timeout_s) == (1800, 2100, 7200)
    assert limits.visibility_timeout_s >= max(limits.segment_hard_s, limits.deliver_hard_s) + VISIBILITY_MARGIN_S
    with pytest.raises(SettingsError, match=r"SPECGATE_BROKER_VISIBILITY_TIMEOUT_SECONDS \(2200\).*"
                                            r"SPECGATE_WORKER_SEGMENT_TIME_LIMIT_SECONDS \(2100\)"):
        Settings.load(broker_visibility_timeout_seconds=2200)  # outlasts it, but by less than the margin
    with pytest.raises(SettingsError, match=r"VISIBILITY_TIMEOUT_SECONDS \(7200\).*DELIVERY_TIME_LIMIT_SECONDS "
                                            r"\(7100\)"):
        Settings.load(worker_delivery_time_limit_seconds=7100)  # a longer task, the default visibility
    with pytest.raises(SettingsError, match=r"SOFT_TIME_LIMIT_SECONDS \(2100\) must be below .*\(2100\)"):
        Settings.load(worker_segment_soft_time_limit_seconds=2100)
    longer = Settings.load(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0",
                           worker_segment_soft_time_limit_seconds=6000, worker_segment_time_limit_seconds=7000,
                           broker_visibility_timeout_seconds=7300)
    conf = make_celery(longer.worker_config()).conf  # builds the app; connects to nothing
    assert conf.broker_transport_options["visibility_timeout"] == 7300
    assert conf.task_annotations[SEGMENT_TASK] == {"soft_time_limit": 6000, "time_limit": 7000}
    assert conf.task_annotations[DELIVER_TASK] == {"soft_time_limit": 900, "time_limit": 1000}
    # a live attempt's heartbeat must never look stale to a claim
    with pytest.raises(SettingsError, match=r"WORKER_STALE_SECONDS \(120\) must be at least 3 x "
                                            r"SPECGATE_WORKER_HEARTBEAT_SECONDS \(60\)"):
        Settings.load(worker_heartbeat_seconds=60)
    # the worker does not start with the relation broken, and says why
    refused = CliRunner().invoke(main, ["worker"], env={"SPECGATE_DATA_DIR": str(tmp_path),
                                                        "SPECGATE_BROKER_VISIBILITY_TIMEOUT_SECONDS": "1800"})
    assert refused.exit_code == 2
    assert "(1800)" in refused.output and "(2100)" in refused.output, refused.output


def test_archives_and_completeness_are_parsed_and_checked_at_start(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECGATE_ARCHIVES", "pacs=ORTHANC@pacs.local:4242, web=https://vna.local/dicom-web/")
    monkeypatch.setenv("SPECGATE_ALLOWED_CALLERS", "CT01@*")
    monkeypatch.setenv("SPECGATE_COMPLETENESS_ARCHIVE", json.dumps({"CT01": "pacs"}))
    cred = tmp_path / "web.cred"
    cred.write_text("specgate:pa55-w0rd-xyz\n")
    monkeypatch.setenv("SPECGATE_ARCHIVE_CREDENTIALS", json.dumps({"web": str(cred)}))
    s = Settings.load()
    assert [(a.name, a.kind) for a in s.archives] == [("pacs", "dimse"), ("web", "dicomweb")]
    assert s.archives[1].url == "https://vna.local/dicom-web"
    c = s.assembly_config().completeness
    assert (c.wait_s, c.timeout_s) == (300.0, 10.0) and c.archive_for("CT01") == s.archives[0]
    assert c.archive_for("MR02") is None and c.credentials_of(s.archives[1]) == cred
    assert "pa55-w0rd-xyz" not in repr(s) + repr(c)  # the file is read when a query is made, never held
    with pytest.raises(SettingsError, match="unknown archive 'nope'"):
        s.archive("nope")
    monkeypatch.delenv("SPECGATE_ARCHIVE_CREDENTIALS")
    for env, value, message in [
        ("SPECGATE_ARCHIVES", "pacs=pacs.local:4242", "is not of the form NAME=AE_TITLE@HOST:PORT"),
        ("SPECGATE_ARCHIVES", "pacs=A@h:1,pacs=B@h:2", "archive names must be unique, repeated: pacs"),
        ("SPECGATE_COMPLETENESS_ARCHIVE", json.dumps({"CT01": "vna"}), "names archive 'vna', which is not configured"),
        ("SPECGATE_COMPLETENESS_ARCHIVE", json.dumps({"MR02": "pacs"}), "'MR02', which is not an allowed caller"),
        ("SPECGATE_ARCHIVE_CREDENTIALS", json.dumps({"pacs": str(cred)}), "'pacs', which is not a DICOMweb archive"),
        ("SPECGATE_ARCHIVE_CREDENTIALS", json.dumps({"web": str(tmp_path / "gone")}), "does not exist"),
        ("SPECGATE_COMPLETENESS_WAIT_SECONDS", "0", "COMPLETENESS_WAIT_SECONDS"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(env, value)
            with pytest.raises(SettingsError, match=message):
                Settings.load()
