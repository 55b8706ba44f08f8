import sys, json, torch
torch.set_num_threads(1)
from focusvlm.models.demo.load import load_demo
from focusvlm.runtime import HFGenerator, load_image
from focusvlm.demo.experiment import installed_picture
m, p = load_demo(sys.argv[1]); g = HFGenerator(m, p)
rows = [json.loads(l) for l in open("benchmarks/results/if_experiment/bench.jsonl")][:400:50]
ims = [load_image(installed_picture(r["image"])) for r in rows]
for name, f in (("question only", lambda r: r["question"]), ("same line", lambda r: r["question"] + " " + r["instruction"]),
                ("instruction first", lambda r: r["instruction"] + "\n" + r["question"])):
    outs = g.generate([f(r) for r in rows], ims, 30)
    print(name, [o.text[:50] for o in outs])
