"""The README's main job: ``specgate demo`` on embedded defaults (SQLite, filesystem broker, no servers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import highdicom
import pytest
from pydicom import dcmread

from tests.peers import free_port

pytestmark = pytest.mark.slow


def test_demo_releases_one_study_and_holds_the_unseen_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECGATE_")}
    env["SPECGATE_SCP_PORT"] = str(free_port())
    out = subprocess.run([sys.executable, "-m", "specgate", "demo", "--timeout", "600"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=700)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    known = re.search(r"CT abdomen \(liver phantom\): job (\d+) sent\s+OODM ([\d.]+) <= tau ([\d.]+)", text)
    unseen = re.search(r"MR head \(hippocampus phantom\): job (\d+) held\s+OODM ([\d.]+) > tau ([\d.]+)", text)
    assert known and unseen, text
    assert float(known.group(2)) <= float(known.group(3)) < float(unseen.group(2))
    delivered = re.search(r"delivered to demo-pacs: (\S+\.dcm)", text)
    assert delivered, text
    seg = highdicom.seg.Segmentation.from_dataset(dcmread(tmp_path / delivered.group(1)))
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames > 0
    evidence = re.search(r"with its evidence \(DICOM SR, TID 1500\): (\S+\.dcm)", text)
    assert evidence, text
    sr = dcmread(tmp_path / evidence.group(1))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == seg.StudyInstanceUID
    assert str(seg.SeriesDescription).startswith("NOT FOR CLINICAL USE")  # the shipped model says so
    # the held one was not delivered: the embedded PACS holds exactly the released study's SEG and SR
    held = sorted(str(dcmread(p).Modality) for p in (tmp_path / "specgate-data" / "demo-pacs").glob("*.dcm"))
    assert held == ["SEG", "SR"]
    env["SPECGATE_DATA_DIR"] = str(tmp_path / "specgate-data")
    verify = subprocess.run([sys.executable, "-m", "specgate", "audit", "verify"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and "OK" in verify.stdout
