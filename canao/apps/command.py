"""Subcommands of the applications: finetune, eval, qa, generate."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import CanaoError
from ..paths import data_dir, data_file, resolve_model_path

SQUAD_TRAIN = "squad/train-subset-v1.1.json"
SQUAD_DEV = "squad/dev-v1.1.json"
WIKITEXT = "wikitext-2/valid.txt"


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_common

    p = sub.add_parser("finetune", help="fine-tune a QA teacher from a pretrained encoder")
    p.add_argument("--base", required=True, help="pretrained encoder folder, or 'minilm' (all-MiniLM-L6-v2)")
    p.add_argument("--task", default="squad", choices=["squad"])
    p.add_argument("--data", help="data folder (laid out like ../shared/data) or a SQuAD train file; default $CANAO_DATA")
    p.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--limit", type=int, help="use only the first N training questions")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke runs)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint the training state every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--eval-limit", type=int, default=0, help="then evaluate on the first N dev questions")
    add_common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="EM/F1 on SQuAD, or perplexity on WikiText-2")
    p.add_argument("--model", required=True, help="QA checkpoint folder, or a decoder (GGUF file / folder / 'smollm2') for lm")
    p.add_argument("--task", required=True, choices=["squad", "lm"])
    p.add_argument("--data", help="data folder or one file; default $CANAO_DATA")
    p.add_argument("--limit", type=int, help="squad: first N questions; lm: first N tokens")
    p.add_argument("--max-len", type=int, default=384, help="squad window length")
    p.add_argument("--stride", type=int, default=None, help="squad: doc stride (128); lm: window stride (256)")
    p.add_argument("--window", type=int, default=512, help="lm: tokens per scoring window")
    p.add_argument("--decode-steps", action="store_true",
                   help="lm, compiled decoder: score one token a step through the decode kernels (quantized activations)")
    p.add_argument("--batch-size", type=int, default=32)
    add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("qa", help="answer one question about a passage")
    p.add_argument("--model", required=True, help="QA checkpoint folder")
    p.add_argument("--context", required=True)
    p.add_argument("--question", required=True)
    add_common(p)
    p.set_defaults(func=cmd_qa)

    p = sub.add_parser("generate", help="generate text with a decoder model")
    p.add_argument("--model", default="smollm2", help="GGUF file, decoder checkpoint folder, or 'smollm2' (default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_common(p)
    p.set_defaults(func=cmd_generate)


def cmd_finetune(args) -> dict:
    from ..train.finetune import FinetuneConfig, finetune_squad

    base = resolve_model_path(args.base)
    train = data_file(args.data, SQUAD_TRAIN)
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                         stride=args.stride, seed=args.seed, limit=args.limit, max_steps=args.max_steps,
                         save_every=args.save_every)
    result = finetune_squad(base, train, args.out, cfg, resume=args.resume)
    if args.eval_limit:
        if data_dir(args.data).is_file():
            raise CanaoError("--eval-limit needs --data to be the data folder, not one file")
        dev = data_file(args.data, SQUAD_DEV)
        result["eval"] = _squad_eval(args.out, dev, args.eval_limit, args.max_len, args.stride, 32)
    if not args.json:
        print(f"saved {result['out']} after {result['steps']} steps on {result['device']} "
              f"(loss {result['first_loss']:.3f} -> {result['last_loss']:.3f})")
        if "eval" in result:
            print(f"dev EM {result['eval']['em']:.1f}  F1 {result['eval']['f1']:.1f}")
    return result


def _squad_eval(model: str, path, limit, max_len: int, stride: int, batch_size: int,
                threads: int | None = None) -> dict:
    from ..tasks import squad
    from .engine import load_qa_engine

    engine = load_qa_engine(model, threads)
    if max_len > engine.info["max_seq"]:
        raise CanaoError(f"{model} runs at most {engine.info['max_seq']} tokens; pass --max-len {engine.info['max_seq']} "
                         "or compile it with a larger --max-seq")
    examples = squad.read_squad(path, limit)
    t0 = time.perf_counter()
    result = squad.evaluate(engine.run, engine.tokenizer, examples, max_len, stride, batch_size, progress=True)
    result.pop("predictions")
    return {**result, "eval_s": time.perf_counter() - t0, "model": str(model), "data": str(path)}


def cmd_eval(args) -> dict:
    if args.task == "squad":
        result = _squad_eval(args.model, data_file(args.data, SQUAD_DEV), args.limit, args.max_len,
                             args.stride or 128, args.batch_size, args.threads)
        if not args.json:
            print(f"SQuAD {result['questions']} questions: EM {result['em']:.2f}  F1 {result['f1']:.2f}")
        return result
    from ..tasks.lm import perplexity
    from .decoders import load_causal_lm

    text = data_file(args.data, WIKITEXT)
    model, tokenizer, _ = load_causal_lm(args.model)
    result = perplexity(model, tokenizer, text, window=args.window, stride=args.stride or 256,
                        max_tokens=args.limit, decode_steps=args.decode_steps)
    if not args.json:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens (window {result['window']}, stride {result['stride']})")
    return result


def cmd_qa(args) -> dict:
    from .qa import QAPipeline

    t0 = time.perf_counter()
    pipeline = QAPipeline.load(args.model, threads=args.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    result = {**pipeline.answer(args.context, args.question), "load_ms": load_ms, "model": pipeline.info}
    if not args.json:
        print(result["answer"])
        print(f"tokenize {result['tokenize_ms']:.1f} ms | model {result['model_ms']:.1f} ms | "
              f"span decoding {result['decode_ms']:.1f} ms | total {result['total_ms']:.1f} ms", file=sys.stderr)
    return result


def cmd_generate(args) -> dict:
    from .generate import Generator

    gen = Generator.load(args.model, threads=args.threads)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    stream = args.stream and not args.json
    result = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, chat=not args.raw,
                          on_token=show if stream else None)
    if not args.json:
        if not stream:
            print(result["text"])
        else:
            print()
        print(f"{result['generated_tokens']} tokens, first after {result['ttft_ms']:.0f} ms, "
              f"{result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return result
