"""The review app over real HTTP (uvicorn on a free port) with a held multi-label result written straight
into the ledger (SQLite and PostgreSQL) and its result folder (tests/integration/review/multilabel.py): the
study page lists the labels the rule sent (name, colour swatch, volume), escaped; the slice PNG draws each
label in its colour; a label the rule did not send is neither listed nor drawn."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from review.app import ReviewActions
from tests.integration.review.helpers import Client, Recorder, ReviewServer, make_user, review_config
from tests.integration.review.multilabel import SLICE, multilabel_job
from worker.segments import PALETTE


@pytest.fixture
def site(migrated, tmp_path):
    settings, _, sessions = migrated
    job = multilabel_job(sessions, tmp_path, settings.results_dir)
    make_user(sessions, "anna", "radiologist")
    rec = Recorder()
    with ReviewServer(review_config(settings), sessions, ReviewActions(deliver=rec.deliver)) as srv:
        client = Client(srv.url)
        assert client.login("anna").status == 303
        yield client, job


def test_the_study_page_lists_each_label_with_its_colour_and_volume(site) -> None:
    client, job = site
    page = client.get(f"/studies/{job.job_id}")
    assert page.status == 200
    section = re.search(r'<section class="panel" id="labels">(.*?)</section>', page.text, re.S)
    assert section, page.text[:2000]
    rows = re.findall(r'<tr class="label" data-value="(\d+)" data-color="(#[0-9a-f]{6})" data-z="(\d+)".*?'
                      r'<span class="label-name">(.*?)</span>.*?<td class="label-volume">(.*?)</td>', section.group(1),
                      re.S)
    voxel_ml = float(np.prod(job.spacing)) / 1000
    largest = [int(np.argmax((job.label_map == s.value).sum(axis=(1, 2)))) for s in job.segments]
    expected = [(str(s.value), "#{:02x}{:02x}{:02x}".format(*s.color), str(z),
                 s.label.replace("<", "&lt;").replace(">", "&gt;"), f"{(job.label_map == s.value).sum() * voxel_ml:.1f} mL")
                for s, z in zip(job.segments, largest, strict=True)]
    assert rows == expected
    assert [r[3] for r in rows] == ["liver", "kidney_left", "kidney_right", "lesion &lt;b&gt;"]  # no spleen
    assert [r[2] for r in rows] == ["2", "4", "4", str(SLICE)]  # the first of equals; the lesion eats slice 6
    assert "lesion <b>" not in page.text  # a label name is escaped like any value from the model
    assert f'style="background: #{PALETTE[0][0]:02x}{PALETTE[0][1]:02x}{PALETTE[0][2]:02x}"' in section.group(1)
    assert "4 in the SEG" in section.group(1)
    assert f'data-z="{SLICE}"' in page.text  # opens on the slice with the most foreground


def test_the_slice_draws_each_label_in_its_colour(site) -> None:
    client, job = site
    reply = client.get(f"/studies/{job.job_id}/slices/{SLICE}.png?overlay=mask")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    rgb = np.asarray(Image.open(io.BytesIO(reply.body)).convert("RGB"))
    lm = job.label_map[SLICE]
    # outline pixels are the label's colour exactly: the top-left corner of the liver, of each kidney
    for segment, (y, x) in zip(job.segments[:3], [(8, 6), (36, 8), (36, 44)], strict=True):
        assert lm[y, x] == segment.value
        assert rgb[y, x].tolist() == list(segment.color), segment.label
    # the spleen (not sent) is not drawn: its pixels are grey
    ys, xs = np.nonzero(lm == 4)
    assert ys.size and all(len(set(rgb[y, x].tolist())) == 1 for y, x in zip(ys, xs, strict=True))
    plain = np.asarray(Image.open(io.BytesIO(client.get(f"/studies/{job.job_id}/slices/{SLICE}.png?overlay=none")
                                             .body)).convert("RGB"))
    assert (plain[..., 0] == plain[..., 1]).all()  # no overlay: grey
