"""The gate behind a model it did not come with: the shipped MONAI bundle ``model/weights/monai_liver_ct``
(a MONAI UNet trained with the bundle's own ``train.json`` on CT liver phantoms, by
``model/weights/build_monai_bundle.py``), its bank fitted through the adapter on the bundle's training
images, then held-out phantoms of every kind at clinical scanner geometries. Prints, never asserts.

    .venv/bin/python bench/external_gate.py                   # 6 held-out cases per kind
    .venv/bin/python bench/external_gate.py --per-kind 3 --bank-variants 1 --cases

The bank: the bundle's own training and validation images (seed ``SEED``, indices 0-23), each at its
own grid and re-gridded to ``--bank-variants`` clinical CT geometries (default 2, the number the shipped
bank has for CT, chosen for it on indices 1100-1109; not tuned again here); one group per image, as
``specgate model fit-ood`` groups them; ``c`` = 2.5, the paper's, not tuned here. The evaluation:
held-out indices from 1000 (never read by the training or the bank) of ``ct_liver`` (in distribution),
``ct_lung`` (a chest CT: CT, but an anatomy the model never saw), ``mr_prostate``, ``mr_hippocampus`` and
``pt_tumour`` (modalities it never saw), each re-gridded to one clinical geometry
(``model.data.clinical.clinical_case``: CT 512x512, 120-300 slices; MR 256-320; PET 128-200). Every case
goes through ``MonaiBundleAdapter.predict``, what the worker runs, and the gate's ``verdict``: OODM above
tau, or (for the other modalities) a modality the bank never saw. The liver's DSC is against the
phantom's own label on the clinical grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("ct_liver", "ct_lung", "mr_prostate", "mr_hippocampus", "pt_tumour")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="default: model/weights/monai_liver_ct")
    ap.add_argument("--per-kind", type=int, default=6)
    ap.add_argument("--bank-variants", type=int, default=2,
                    help="clinical geometries per training image (2: what the shipped bank has for CT)")
    ap.add_argument("--first-index", type=int, default=None, help="default: the held-out range, 1000")
    ap.add_argument("--cases", action="store_true", help="print every case (geometry, OODM/tau, DSC)")
    ap.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the OODM histogram")
    args = ap.parse_args()

    from tqdm import tqdm

    from model.adapters import open_adapter
    from model.bank_fit import BankCase, fit_adapter_bank
    from model.data.clinical import clinical_case
    from model.data.phantoms import phantom_case
    from model.evaluate import oodm_histogram
    from model.scores import dice, ood_detection_metrics
    from model.weights.build_monai_bundle import BUNDLE, HELD_OUT_FIRST, SEED, TRAIN, VAL

    bundle = args.bundle or BUNDLE
    adapter = open_adapter("monai-bundle", bundle)
    t0 = time.perf_counter()

    def bank_cases():  # type: ignore[no-untyped-def]
        for i in range(TRAIN + VAL):
            c = phantom_case("ct_liver", SEED, i)
            yield BankCase(c.image, c.spacing, c.modality, f"ct_liver-{i}")
            for v in range(args.bank_variants):
                cc, _ = clinical_case("ct_liver", SEED, i, variant=100 + v)
                yield BankCase(cc.image, cc.spacing, cc.modality, f"ct_liver-{i}")

    n_bank = (TRAIN + VAL) * (1 + args.bank_variants)
    gate = fit_adapter_bank(adapter, tqdm(bank_cases(), total=n_bank, desc="bank", unit="case"))
    t_bank = time.perf_counter() - t0

    rows: dict[str, dict[str, list]] = {k: {"ratio": [], "dsc": [], "reason": [], "seconds": [], "shape": []}
                                        for k in KINDS}
    for kind in KINDS:
        r = rows[kind]
        first = HELD_OUT_FIRST if args.first_index is None else args.first_index
        for i in tqdm(range(first, first + args.per_kind), desc=kind, unit="case"):
            case, geom = clinical_case(kind, SEED, i)
            t = time.perf_counter()
            pred = adapter.predict(case.image, case.spacing, case.modality)
            r["seconds"].append(time.perf_counter() - t)
            oodm, _ood, reason = gate.verdict(pred.signature, case.modality)
            r["ratio"].append(oodm / gate.tau)
            r["reason"].append(reason or "released")
            r["shape"].append(case.image.shape)
            if kind == "ct_liver":
                r["dsc"].append(dice(pred.labels == 1, case.label))
            if args.cases:
                tqdm.write(f"  {kind} {i}: {geom.shape} x {tuple(round(v, 3) for v in geom.spacing)} mm, shift "
                           f"{geom.shift_mm} mm: OODM {oodm / gate.tau:.2f} tau ({reason or 'released'})"
                           + (f", DSC {r['dsc'][-1]:.3f}" if kind == "ct_liver" else ""))
            del case, pred

    print(f"\nMONAI bundle {adapter.name} {adapter.version} (layer {adapter.layer}); bank of {gate.bank.shape[0]} "
          f"signatures from {TRAIN + VAL} training images x {1 + args.bank_variants} grids, tau {gate.tau:.4f} "
          f"(c={gate.c}), fitted in {t_bank:.0f} s; {args.per_kind} held-out cases per kind at clinical geometry")
    print(f"{'kind':<16} {'role':<4} {'n':>3} {'released':>9} {'held':>6}  {'OODM/tau min/median/max':<26} "
          f"{'reasons':<44} {'DSC':>6} {'s/case':>7}")
    scores_in: list[float] = []
    scores_out: list[float] = []
    for kind in KINDS:
        r = rows[kind]
        ratio = np.array(r["ratio"])
        is_in = kind == "ct_liver"
        (scores_in if is_in else scores_out).extend(ratio.tolist())
        released = r["reason"].count("released") / len(ratio)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["reason"]).items()))
        dsc = f"{np.mean(r['dsc']):.3f}" if r["dsc"] else "-"
        print(f"{kind:<16} {'in' if is_in else 'OOD':<4} {len(ratio):>3} {100 * released:>8.0f}% "
              f"{100 * (1 - released):>5.0f}%  {ratio.min():>6.2f} / {np.median(ratio):>5.2f} / {ratio.max():>7.2f}    "
              f"{reasons:<44} {dsc:>6} {np.mean(r['seconds']):>7.1f}")
    m = ood_detection_metrics(scores_in, scores_out, 1.0)
    print(f"OODM alone (no modality rule), in vs every unseen kind: AUC {m['auc']:.4f}, sensitivity "
          f"{m['sensitivity']:.3f}, specificity {m['specificity']:.3f} (in={len(scores_in)}, OOD={len(scores_out)})")
    ct_out = rows["ct_lung"]["ratio"]
    m_ct = ood_detection_metrics(scores_in, ct_out, 1.0)
    print(f"OODM alone, ct_liver vs ct_lung (same modality): AUC {m_ct['auc']:.4f}, sensitivity "
          f"{m_ct['sensitivity']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    hist = args.out / "external_gate_oodm_histogram.png"
    oodm_histogram({"ct_liver": [v * gate.tau for v in rows["ct_liver"]["ratio"]]},
                   {k: [v * gate.tau for v in rows[k]["ratio"]] for k in KINDS if k != "ct_liver"}, gate.tau, hist)
    print(f"OODM histogram: {hist}; whole run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
