#!/usr/bin/env bash
# Pretrained conversion on the digits ViT (sklearn's real 8x8 digits, dim 64, depth 2):
# dense -> STL (t=4, r=24, random init) with and without least-squares calibration, then
# fine-tuning with distillation from the dense model. Regenerates every file in this directory.
# Checkpoints go to $RUNS (default runs/calibrate, not committed). ~5 min on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/calibrate}
RES=results/calibrate
rm -rf "$RUNS"
T="$PY -m strassenkit train --task digits --no-progress --seed 0"
$T --steps 300 --out $RUNS/dense --results $RES/dense
$T --stl --steps 300 --out $RUNS/stl-scratch --results $RES/stl-scratch
$T --stl --from-dense $RUNS/dense --steps 0 --out $RUNS/stl-converted --results $RES/stl-converted
for a in 0 2 5; do
  $T --stl --from-dense $RUNS/dense --calibrate-batches 8 --alternate $a --steps 0 --out $RUNS/stl-cal$a --results $RES/stl-cal$a
done
# three seeds (STL init, calibration batches, fine-tuning batches) for the runs that are compared
for s in 0 1 2; do
  T="$PY -m strassenkit train --task digits --no-progress --seed $s"
  [ $s = 0 ] || $T --stl --from-dense $RUNS/dense --calibrate-batches 8 --alternate 5 --steps 0 --out $RUNS/stl-cal5-s$s --results $RES/stl-cal5-s$s
  $T --stl --from-dense $RUNS/dense --kd 0.5 --steps 100 --out $RUNS/stl-converted-ft-s$s --results $RES/stl-converted-ft-s$s
  $T --stl --from-dense $RUNS/dense --calibrate-batches 8 --alternate 5 --kd 0.5 --steps 100 --out $RUNS/stl-cal5-ft-s$s --results $RES/stl-cal5-ft-s$s
done
$PY - <<'PY'
import json, os
res = "results/calibrate"
groups = {"stl-cal5": ["stl-cal5", "stl-cal5-s1", "stl-cal5-s2"],
          "stl-converted-ft": [f"stl-converted-ft-s{s}" for s in range(3)],
          "stl-cal5-ft": [f"stl-cal5-ft-s{s}" for s in range(3)]}
rows = ["dense", "stl-scratch", "stl-converted", "stl-cal0", "stl-cal2"] + [r for g in groups.values() for r in g]
out = ["| run | training steps | calibration (batches x 64, alternate) | KD | test acc after conversion | after calibration | final test acc | MACs/sample |",
       "|---|---|---|---|---|---|---|---|"]
for r in rows:
    d = json.load(open(os.path.join(res, r, "summary.json")))
    c, st = d["config"], d.get("stages", {})
    cal = c.get("calibrate")
    f = lambda k: "%.3f" % st[k]["eval_acc"] if k in st else "-"
    cal_s = "-" if not cal else "%d, %d" % (cal["batches"], cal["alternate"])
    out.append(f"| {r} | {c['train']['steps']} | {cal_s} | "
               f"{c.get('kd') or '-'} | {f('converted')} | {f('calibrated')} | {d['eval_acc']:.3f} | {d['macs_per_sample']:,} |")
import statistics
out += ["", "Mean and spread (min-max) over seeds 0, 1, 2:", "", "| runs | final test acc mean | min | max |", "|---|---|---|---|"]
for g, names in groups.items():
    accs = [json.load(open(os.path.join(res, n, "summary.json")))["eval_acc"] for n in names]
    out.append(f"| {g} | {statistics.mean(accs):.3f} | {min(accs):.3f} | {max(accs):.3f} |")
open(os.path.join(res, "table.md"), "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
