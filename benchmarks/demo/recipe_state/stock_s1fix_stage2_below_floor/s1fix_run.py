from focusvlm.demo import recipe as R
R.run("runs/s1fix", R.DemoRecipe(sentence_per_batch=0, text_per_batch=0, bf16=False), progress=False, log=lambda s: print(s, flush=True))
