"""A tiny, local ARES training setup: a random-weight causal LM, a toy task and a short GRPO run.

Used by the test suite and ``python -m research.ares.grpo_tiny`` to run the ARES reward and KL controller through
TRL's ``GRPOTrainer`` on CPU in seconds. Nothing is downloaded: the model is built from a config and the
tokenizer is :func:`tokenreduce.testing.tiny.tiny_tokenizer` (words ``w3 ... w995``).

The task: a prompt is three words ``w<a> w<b> w<c>``; the answer is the word ``w<3 + (a + b) mod 16>``; a
completion is correct when it contains the answer word. The model's output layer favours the 16 answer
words and four trigger words, so random rollouts succeed at varied rates and all three difficulty buckets
occur.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

ANSWER_WORDS = 16
TRIGGER_WORDS = ("w20", "w21", "w22", "w23")


def tiny_causal_lm(seed: int = 0, hidden: int = 32, layers: int = 2) -> torch.nn.Module:
    """A random-weight ``Qwen2ForCausalLM`` over the tiny tokenizer's 1000 ids, favouring the toy's words."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokenreduce.testing.tiny import BOS, EOS, PAD, VOCAB

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    favoured = list(range(3, 3 + ANSWER_WORDS)) + [int(w[1:]) for w in TRIGGER_WORDS]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.02, generator=g)
        model.lm_head.weight[favoured] = torch.randn(len(favoured), hidden, generator=g) * 0.7
        model.lm_head.weight[EOS] = 0.0
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def toy_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompts with their answers: ``{"prompt": "w<a> w<b> w<c>", "answer": "w<k>"}``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b, c = (int(x) for x in torch.randint(100, 900, (3,), generator=g))
        rows.append({"prompt": f"w{a} w{b} w{c}", "answer": f"w{3 + (a + b) % ANSWER_WORDS}"})
    return rows


def toy_correct(completion: str, answer: str, **_: Any) -> float:
    """1.0 when the completion contains the answer word."""
    return 1.0 if answer in completion.split() else 0.0


def run_grpo(
    out_dir: str | Path,
    *,
    steps: int = 3,
    prompts: int = 16,
    num_generations: int = 4,
    batch_size: int = 8,
    completion_length: int = 12,
    variant: str = "code",
    seed: int = 0,
) -> dict[str, Any]:
    """A few GRPO steps with the ARES reward and the per-bucket KL controller; returns what happened.

    The result holds the trainer's log history, the reward function's last batch (buckets, ``N_HE``,
    threshold, targets, ``α_d``), the KL controller's state, the parameter change and the wall time.
    """
    from datasets import Dataset
    from trl import GRPOConfig

    from tokenreduce.plugins.ares.grpo import AresGRPOTrainer, AresRewardFunction
    from tokenreduce.plugins.ares.training import CodeKLController, TriggerVocabulary
    from tokenreduce.testing.tiny import tiny_tokenizer

    start = time.perf_counter()
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(seed)
    # TRL builds the reference model from the policy's path: save the initial weights where it looks.
    init = Path(out_dir) / "initial_policy"
    model.save_pretrained(init)
    model.config._name_or_path = str(init)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    reward = AresRewardFunction(
        model, tokenizer, toy_correct, variant=variant,
        trigger=TriggerVocabulary(tokenizer, words=TRIGGER_WORDS) if variant == "code" else None,
    )
    # Update the KL weights every micro-step (the code waits 100) so a short run exercises the controller.
    controller = CodeKLController(interval=1)
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=batch_size, num_generations=num_generations,
        max_completion_length=completion_length, max_steps=steps, learning_rate=5e-3, beta=0.01,
        temperature=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        seed=seed, dataloader_num_workers=0, disable_dropout=True, epsilon=0.2, epsilon_high=0.3,
        loss_type="dapo",
    )
    trainer = AresGRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=Dataset.from_list(toy_rows(prompts, seed)),
        processing_class=tokenizer, ares_reward=reward, kl_controller=controller,
    )
    trainer.train()
    change = sum(float((p.detach() - before[k]).abs().sum()) for k, p in trainer.model.named_parameters())
    return {
        "log_history": trainer.state.log_history,
        "last_batch": reward.last,
        "kl": controller.state_dict(),
        "parameter_change": change,
        "seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
    }
