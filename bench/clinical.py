"""The shipped model and its gate on the clinical-geometry set: released / held rates, AUC, DSC on the
source grid against the native grid. Prints, never asserts.

    .venv/bin/python bench/clinical.py                          # 10 held-out cases per kind x 2 geometries
    .venv/bin/python bench/clinical.py --per-kind 4 --variants 1 --dicom

Cases are held-out phantoms of every kind (indices from 1000: never in training or the bank), each
re-gridded to ``--variants`` clinical scanner geometries by ``model.data.clinical.clinical_case`` (CT
512x512, 120-300 slices; MR 256-320 square, 40-180 slices; PET 128-200 square; fields of view 0.8x to 3x
the phantom: some padded with air, some cropped). Each goes through the worker's path
(``model.study_inference.segment_volume`` with the weights' settings). With ``--dicom`` every case is written as a
DICOM series and read back by the evaluation loader first (``model.data.volumes.MSDDataset``), as
``specgate model evaluate`` reads it.

Targets from the issue: in-distribution released >= 95 % for each kind, unseen held 100 %, AUC >= 0.98
over all geometries together, DSC on the source grid within 0.02 of the native-grid DSC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=10)
    ap.add_argument("--variants", type=int, default=2, help="clinical geometries per held-out case")
    ap.add_argument("--first-index", type=int, default=1000)
    ap.add_argument("--dicom", action="store_true", help="write each case as DICOM and read it back first")
    ap.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the OODM histogram")
    args = ap.parse_args()

    from tqdm import tqdm

    from model.data.clinical import clinical_case, write_clinical_set
    from model.data.phantoms import TRAINING_KINDS, UNSEEN_KINDS, phantom_case
    from model.data.volumes import MSDDataset
    from model.evaluate import oodm_histogram
    from model.ood import SpectralGate, sha256_file
    from model.scores import dice, ood_detection_metrics
    from model.study_inference import InferenceSettings, segment_volume
    from model.unet import load_weights
    from model.weights import BANK_PATH, WEIGHTS_PATH
    from model.weights.build import SEED

    net, meta = load_weights(WEIGHTS_PATH)
    settings = InferenceSettings.for_weights(meta)
    gate = SpectralGate.load(BANK_PATH, weights_sha256=sha256_file(WEIGHTS_PATH))
    gate.check_inference(settings.signature_settings(), "this benchmark")
    kinds = [*TRAINING_KINDS, *UNSEEN_KINDS]
    rows: dict[str, dict[str, list[float]]] = {}
    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="specgate-clinical-")
    try:
        for kind in kinds:
            r = rows.setdefault(kind, {"ratio": [], "dsc": [], "dsc_native": [], "seconds": []})
            spec = [(i, v) for i in range(args.first_index, args.first_index + args.per_kind)
                    for v in range(args.variants)]
            native_dsc: dict[int, float] = {}
            for i, v in tqdm(spec, desc=kind, unit="case"):
                if i not in native_dsc:
                    c = phantom_case(kind, SEED, i)
                    res = segment_volume(net, c.image, c.spacing, c.modality, settings, out_dtype=np.float32)
                    native_dsc[i] = dice(res.foreground >= 0.5, c.label)
                if args.dicom:
                    root = Path(tmp.name) / f"{kind}-{i}-{v}"
                    _, geom = clinical_case(kind, SEED, i, v)
                    ds = MSDDataset(write_clinical_set(root, kind, 1, SEED, first_index=i, geometry=geom))
                    case = ds[0]
                else:
                    case, _ = clinical_case(kind, SEED, i, v)
                t0 = time.perf_counter()
                res = segment_volume(net, case.image, case.spacing, case.modality, settings, out_dtype=np.float32)
                r["seconds"].append(time.perf_counter() - t0)
                r["ratio"].append(gate.score(res.signature) / gate.tau)
                r["dsc"].append(dice(res.foreground >= 0.5, case.label))
                r["dsc_native"].append(native_dsc[i])
                del case, res
    finally:
        tmp.cleanup()

    print(f"\nshipped model {meta.get('name')} {meta.get('version')}, tau {gate.tau:.4f}, "
          f"{args.per_kind} held-out cases x {args.variants} clinical geometries per kind"
          f"{' (written and read as DICOM)' if args.dicom else ''}, {time.perf_counter() - t_start:.0f} s")
    print(f"{'kind':<16} {'role':<4} {'n':>3} {'released':>9} {'held':>6}  {'OODM/tau min/median/max':<24} "
          f"{'DSC src':>8} {'DSC nat':>8} {'diff':>6} {'s/case':>7}")
    scores_in: list[float] = []
    scores_out: list[float] = []
    for kind in kinds:
        r = rows[kind]
        ratio = np.array(r["ratio"])
        is_in = kind in TRAINING_KINDS
        (scores_in if is_in else scores_out).extend(ratio.tolist())
        released = float(np.mean(ratio <= 1.0))
        dsc, nat = float(np.mean(r["dsc"])), float(np.mean(r["dsc_native"]))
        print(f"{kind:<16} {'in' if is_in else 'OOD':<4} {len(ratio):>3} {100 * released:>8.0f}% "
              f"{100 * (1 - released):>5.0f}%  {ratio.min():>6.2f} / {np.median(ratio):>5.2f} / {ratio.max():>6.2f}    "
              f"{dsc:>8.3f} {nat:>8.3f} {dsc - nat:>+6.3f} {np.mean(r['seconds']):>7.1f}")
    m = ood_detection_metrics(scores_in, scores_out, 1.0)
    print(f"OOD detection over all geometries: AUC {m['auc']:.4f}, accuracy {m['accuracy']:.3f}, "
          f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f} "
          f"(in={len(scores_in)}, OOD={len(scores_out)})")
    print("targets: released >= 95 % per in-distribution kind, held 100 % per unseen kind, AUC >= 0.98, "
          "|DSC src - DSC nat| <= 0.02")
    args.out.mkdir(parents=True, exist_ok=True)
    hist = args.out / "clinical_oodm_histogram.png"
    oodm_histogram({k: [v * gate.tau for v in rows[k]["ratio"]] for k in TRAINING_KINDS},
                   {k: [v * gate.tau for v in rows[k]["ratio"]] for k in UNSEEN_KINDS}, gate.tau, hist)
    print(f"OODM histogram: {hist}")


if __name__ == "__main__":
    main()
