import tokenreduce as tr
from tokenreduce.eval.synthetic import load_synthetic, model_dir, prompt

# The shipped tiny LLaVA (a real LlavaForConditionalGeneration) and one test question of its benchmark.
model, processor = tr.from_pretrained(model_dir("image"), "pool", keep=0.25)  # load and wrap in place
sample = load_synthetic("image", "test", n=1)[0]
inputs = processor(images=sample.images, text=prompt(sample), return_tensors="pt")

out = model.generate(**inputs, max_new_tokens=4, do_sample=False)  # call sites unchanged
answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
print(f"{sample.question} -> {answer.strip()} (expected {sample.answer})")
print(tr.stats(model))  # tokens per stage and layer, FLOPs ratio, time in the reducer
tr.unwrap(model)        # the exact original model again
