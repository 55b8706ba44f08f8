import sys, json
from focusvlm.models.demo.load import load_demo
from focusvlm.runtime import HFGenerator, load_image
from focusvlm.demo.experiment import installed_picture
m, p = load_demo(sys.argv[1]); g = HFGenerator(m, p)
rows = [json.loads(l) for l in open("benchmarks/results/if_experiment/bench.jsonl")][:400:25]
outs = g.generate([r["prompt"] for r in rows], [load_image(installed_picture(r["image"])) for r in rows], 40)
for r, o in zip(rows, outs): print(repr(r["prompt"][:60]), "->", repr(o.text[:100]))
