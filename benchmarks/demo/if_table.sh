#!/usr/bin/env bash
# Issue 16's instruction-following table on the shipped demo twins: the paper16 suite built from easy-VQA
# test questions, answered by (a) the stock twin, (b) the VMTC+CMAI-trained twin as trained, (c) the stock
# twin with VMTC+CMAI at inference, (d) the stock twin with describe-then-answer; scored by `focusvlm score if`.
#   bash benchmarks/demo/if_table.sh OUT [QUESTIONS]      (QUESTIONS: default 20)
set -euo pipefail
OUT=${1:?output folder}
N=${2:-20}
FOCUS=$(python -c "from focusvlm.models.demo import demo_focus_config_path as p; print(p())")
mkdir -p "$OUT"
python - "$OUT/questions.jsonl" <<'PY'
import json, sys
from focusvlm.demo import data as D
rows = D.question_rows(D.test_items(2000, seed=0))
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
focusvlm ifbench build --questions "$OUT/questions.jsonl" --suite paper16 --seed 0 --limit "$N" -o "$OUT/bench.jsonl"
COMMON=(--bench "$OUT/bench.jsonl" --max-new-tokens 96 --batch-size 16 --device cpu --no-progress)
focusvlm eval if --model demo --out "$OUT/stock" "${COMMON[@]}"
RUNS=(stock)
if [ -f "$FOCUS" ]; then  # the VMTC+CMAI-trained twin, where it ships
  focusvlm eval if --model demo-focus --config "$FOCUS" --out "$OUT/focus-trained" "${COMMON[@]}"; RUNS+=(focus-trained)
else
  printf 'vmtc: {target: 0.5}\ncmai: {gamma_max: 0.6}\n' > "$OUT/focus.yaml"; FOCUS="$OUT/focus.yaml"
fi
focusvlm eval if --model demo --config "$FOCUS" --out "$OUT/stock+vmtc+cmai" "${COMMON[@]}"
focusvlm eval if --model demo --mode describe-then-answer --out "$OUT/describe-then-answer" "${COMMON[@]}"
RUNS+=(stock+vmtc+cmai describe-then-answer)
for run in "${RUNS[@]}"; do focusvlm score if "$OUT/$run"; done
focusvlm report "${RUNS[@]/#/$OUT/}"
