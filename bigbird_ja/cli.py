"""`bigbird-ja <subcommand>`: the command line only parses arguments and calls library functions.

Subcommands:
  convert   warm-start a bigbird_ja checkpoint from a local DeBERTa-v2/v3 or BigBird checkpoint; lengthen one
  layout    draw the block-sparse attention pattern of a config as a PNG
  train-tokenizer  train the Japanese SentencePiece unigram tokenizer (MeCab word boundaries, byte fallback)
  prepare   tokenise and pack text / JSON lines / Parquet / saved datasets into resumable pretraining shards
  pretrain  MLM pretraining on DeepSpeed from a run preset (configs/pretrain/*.yaml), --section.key=value overrides
  plan      memory, step time, days and GPU-hours of a pretraining run on N GPUs; recommends a setting, writes a preset
  export    write a pretraining checkpoint as a save_pretrained folder (safetensors + tokenizer)
  finetune  fine-tune on a JGLUE task (jsquad over long documents, jnli, jsts, jcommonsenseqa, marc-ja) or the
            generated long-range QA task; --section.key=value overrides (configs/finetune/*.yaml)
  evaluate  score a predictions file (SQuAD format for jsquad) or run a fine-tuned model over a data file;
            jsquad --retrieval: questions against every article by embedding (recall@k, MRR)

Options that name a file or folder the command writes are spelled --out (--metrics-out, --predictions-out where a
command writes several). Unknown arguments of pretrain, finetune and evaluate are run-config overrides
(--section.key=value), so their options are never abbreviated and the data files are --train-file / --valid-file
(--train.epochs=3 is the train section). Errors a user can fix (a bad config or argument, a missing file or
package, a failed preflight check) end with one line and exit status 2; anything else (CUDA out of memory, an NCCL
failure, a bug) propagates with its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import sys


def cmd_convert(args) -> int:
    from .convert import convert_checkpoint

    report = convert_checkpoint(
        args.src, args.dst, attention_type=args.attention_type, block_size=args.block_size,
        max_length=args.max_length, num_window_blocks=args.num_window_blocks,
        num_global_blocks=args.num_global_blocks, num_random_blocks=args.num_random_blocks,
        max_relative_positions=args.max_relative_positions, allow_missing=args.allow_missing,
        allow_unused=args.allow_unused, overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {args.dst}")
    return 0


# What a drawing shows: one cell per block pair, a panel per head. Beyond these there are more cells than pixels
# and the layout's memory (heads x blocks x the blocks random ones are drawn over, ~40 bytes each) runs away:
# 10M tokens asked for ~195 GB.
MAX_DRAWN_BLOCKS = 1024
MAX_DRAWN_HEADS = 64
MAX_DRAWN_CELLS = 1 << 24


def _check_drawable(config, args) -> None:
    """Refuse what the model cannot take or no drawing can show, naming the option and the limit."""
    from .attention import SparsitySpec

    seq_len, longest = args.seq_len, config.max_position_embeddings
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len}: must be a positive number of tokens")
    if seq_len > longest:
        raise ValueError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings={longest} "
                         f"({args.config or 'the default config'}), and the model refuses longer inputs: draw "
                         f"--seq-len {longest} or less, or a longer model with --max-length {seq_len}")
    blocks = -(-seq_len // config.block_size)
    if blocks > MAX_DRAWN_BLOCKS:
        raise ValueError(f"--seq-len {seq_len} is {blocks:,} blocks of {config.block_size}: a drawing shows at most "
                         f"{MAX_DRAWN_BLOCKS:,} blocks a side ({MAX_DRAWN_BLOCKS * config.block_size:,} tokens at "
                         f"this block size). Draw a shorter --seq-len (the pattern repeats along the diagonal) or "
                         f"a larger --block-size")
    if not 0 <= args.layer < config.num_hidden_layers:
        raise ValueError(f"--layer {args.layer}: the model's layers are 0 to {config.num_hidden_layers - 1}")
    heads = config.num_attention_heads
    if args.head is not None and not 0 <= args.head < heads:
        raise ValueError(f"--head {args.head}: the model's heads are 0 to {heads - 1}")
    if args.head is None and heads > MAX_DRAWN_HEADS:
        raise ValueError(f"{heads} heads: a drawing shows at most {MAX_DRAWN_HEADS} as a grid; pick one with --head "
                         f"(0 to {heads - 1}) or set fewer with --num-heads")
    horizon = SparsitySpec.from_config(config).horizon_blocks
    drawn_over = blocks if config.attention_type == "full" else max(blocks, horizon)
    if heads * blocks * drawn_over > MAX_DRAWN_CELLS:
        raise ValueError(f"the layout of {heads} heads x {blocks:,} blocks (random blocks drawn over {drawn_over:,}) "
                         f"is more than a drawing takes ({MAX_DRAWN_CELLS:,} cells; the memory grows with them): draw "
                         f"a shorter --seq-len or --max-length, a larger --block-size or fewer --num-heads")


def cmd_layout(args) -> int:
    from .configuration import build_model_config
    from .plotting import draw_layout

    given = {"--attention-type": ("attention_type", args.attention_type),
             "--block-size": ("block_size", args.block_size),
             "--num-window-blocks": ("num_window_blocks", args.num_window_blocks),
             "--num-global-blocks": ("num_global_blocks", args.num_global_blocks),
             "--num-random-blocks": ("num_random_blocks", args.num_random_blocks),
             "--random-seed": ("random_seed", args.random_seed), "--num-heads": ("num_attention_heads", args.num_heads),
             "--max-length": ("max_position_embeddings", args.max_length)}
    given = {flag: field_value for flag, field_value in given.items() if field_value[1] is not None}
    # the config and the layout name their fields: say which options set them
    options = f" (layout options: {' '.join(f'{flag} {value}' for flag, (_, value) in given.items())})" if given else ""
    try:
        config = build_model_config(args.config, dict(given.values()), what="layout options")
    except ValueError as err:
        raise ValueError(f"{err}{options}") from None
    _check_drawable(config, args)
    try:
        path = draw_layout(config, args.seq_len, args.out, layer_idx=args.layer, head=args.head)
    except ValueError as err:
        raise ValueError(f"{err}{options}") from None
    print(f"wrote {path}")
    return 0


def cmd_train_tokenizer(args) -> int:
    from .tokenization import train_tokenizer

    report = train_tokenizer(
        args.input, args.out, args.vocab_size, pretokenize=args.pretokenize, shrink_vocab=args.shrink_vocab,
        input_sentence_size=args.input_sentence_size, character_coverage=args.character_coverage,
        model_max_length=args.model_max_length, seed=args.seed, overwrite=args.overwrite, encoding=args.encoding,
        max_invalid_fraction=args.max_invalid_fraction,
    )
    print(report.summary())
    return 0


def cmd_prepare(args) -> int:
    from .data.cleaning import CleaningOptions
    from .data.preparation import PrepareOptions, parse_worker, prepare
    from .data.sources import SourceOptions

    options = PrepareOptions(
        source=SourceOptions(input_format=args.format, text_field=args.text_field),
        cleaning=CleaningOptions(normalization=None if args.normalization == "none" else args.normalization,
                                 encoding=args.encoding, max_invalid_fraction=args.max_invalid_fraction),
        slice_bytes=args.slice_bytes,
    )
    report = prepare(args.tokenizer, args.input, args.out, seq_len=args.seq_len, seed=args.seed,
                     num_workers=args.num_workers, shard_tokens=args.shard_tokens, options=options,
                     overwrite=args.overwrite, progress=not args.no_progress,
                     worker=parse_worker(args.slice) if args.slice else None, merge_only=args.merge)
    print(report.summary())
    return 0


def cmd_pretrain(args) -> int:
    from .training import load_pretrain_config, pretrain

    pretrain(load_pretrain_config(args.config, args.overrides), resume=args.resume, dry_run=args.dry_run)
    return 0


def cmd_plan(args) -> int:
    from .training import planner

    if args.update_headers:
        for path, changed in planner.update_preset_headers(args.presets):
            print(f"{'updated' if changed else 'unchanged'} {path}")
        return 0
    if args.tokens is None:
        raise ValueError("plan: give --tokens (the run's token budget, e.g. 48e9), or --update-headers")
    gpu = planner.resolve_gpu(args.gpu, args.memory_gib, args.peak_tflops, args.intra_node_gbps,
                              args.inter_node_gbps)
    overrides = planner.parse_model_overrides(args.model_override)
    plan = planner.plan_run(args.model, args.seq_len, gpu, args.nodes, args.gpus_per_node, args.tokens,
                            global_batch=args.global_batch, precision=args.precision, micro_batch=args.micro_batch,
                            efficiency=args.compute_efficiency, model_overrides=overrides)
    print(planner.format_plan(plan))
    if args.json_out:
        planner.write_plan_json(plan, args.json_out)
        print(f"wrote {args.json_out}")
    if args.write:
        print(f"wrote {planner.write_preset(plan, args.base_preset, args.write)}")
    return 0


def cmd_export(args) -> int:
    from .training import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite).summary())
    return 0


def cmd_export_onnx(args) -> int:
    from .deploy import export_onnx_folder

    # The graph is renamed into place only after onnxruntime agrees with PyTorch (NaN fails): an error leaves no file.
    description, checks = export_onnx_folder(args.model, args.out, check_lengths=args.check_lengths,
                                             opset=args.opset)
    print(f"wrote {args.out}: inputs {description['inputs']} -> outputs {description['outputs']}; any batch, "
          f"{description['min_length']}-{description['max_length']} tokens ({description['shorter_inputs']}; "
          f"{description['longer_inputs']})")
    if not checks:
        print("onnxruntime is not installed: the graph was not checked (pip install onnxruntime)")
    for row in checks:
        print(f"  onnxruntime vs PyTorch, {row['length']} tokens, {row['output']}: max |diff| {row['max_abs_diff']:.2e}")
    return 0


def cmd_finetune(args) -> int:
    from .finetune import finetune

    finetune(args.task, args.config, overrides=args.overrides, model=args.model, train=args.train_file,
             valid=args.valid_file, output=args.out)
    return 0


def cmd_evaluate(args) -> int:
    import json

    if args.retrieval:
        return _evaluate_retrieval(args)
    from .finetune import evaluate_model, evaluate_predictions

    if args.max_length is not None or args.truncate_to is not None:
        raise ValueError("--max-length and --truncate-to apply to --retrieval runs; QA windows are "
                         "--data.max_length=N overrides")
    if (args.predictions is None) == (args.model is None):
        raise ValueError("give exactly one of --predictions FILE (score a predictions file) or --model DIR (run a "
                         "fine-tuned model over --data)")
    if args.predictions is not None:
        if args.overrides:
            raise ValueError(f"--section.key=value overrides apply to --model runs only; got {args.overrides}")
        metrics, check = evaluate_predictions(args.task, args.predictions, args.data, output=args.metrics_out)
        print(check.summary())
    else:
        metrics = evaluate_model(args.task, args.model, args.data, args.config, overrides=args.overrides,
                                 output=args.metrics_out, predictions_out=args.predictions_out)
    print(json.dumps(metrics, ensure_ascii=False))
    if args.metrics_out:
        print(f"wrote {args.metrics_out}")
    return 0


def _evaluate_retrieval(args) -> int:
    import json

    from .embeddings import evaluate_retrieval
    from .finetune.jglue import read_squad

    if args.task != "jsquad" or args.model is None or args.predictions is not None or args.overrides:
        raise ValueError("--retrieval runs an encoder over a JSQuAD file: bigbird-ja evaluate jsquad --retrieval "
                         "--model DIR --data FILE [--max-length N] [--truncate-to N] (no --predictions or "
                         "overrides)")
    metrics = evaluate_retrieval(args.model, read_squad(args.data), max_length=args.max_length,
                                 truncate_to=args.truncate_to, output=args.metrics_out)
    print(json.dumps(metrics, ensure_ascii=False))
    if args.metrics_out:
        print(f"wrote {args.metrics_out}")
    return 0


def _sparsity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attention-type", choices=["block_sparse", "full"])
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--num-window-blocks", type=int)
    parser.add_argument("--num-global-blocks", type=int)
    parser.add_argument("--num-random-blocks", type=int)


class _TaskNames:
    """The task choices of finetune / evaluate: the names in the task registry (`bigbird_ja.finetune.tasks.TASKS`),
    read when a task argument is checked or help is shown, so other subcommands never import the finetune package."""

    @staticmethod
    def _names() -> list[str]:
        from .finetune.tasks import TASKS

        return list(TASKS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """--encoding and --max-invalid-fraction of prepare and train-tokenizer (`data.cleaning.CleaningOptions`)."""
    parser.add_argument("--encoding", default="utf-8", help="encoding of the text / JSON-lines inputs (default "
                        "utf-8; e.g. utf-16, cp932 (Windows Shift-JIS), euc-jp, latin-1): decoded, then cleaned as "
                        "usual. Read as UTF-8, a file in another encoding is refused with a message saying what it "
                        "looks like")
    parser.add_argument("--max-invalid-fraction", type=float, default=0.01, metavar="F", help="refuse a file "
                        "with invalid bytes on more than this share of its lines (default 0.01: a wrong encoding, "
                        "not a few damaged bytes; 1 accepts any, the bytes dropped and counted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigbird-ja", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment is what is used
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices  # name -> subparser

    p = sub.add_parser("convert", help="warm-start from a local DeBERTa-v2/v3 or BigBird checkpoint, or lengthen a "
                       "bigbird-ja one (--max-length)")
    p.add_argument("src", help="transformers checkpoint folder (config.json + weights + tokenizer files); a bigbird-ja "
                   "folder is lengthened to --max-length, its outputs on shorter inputs unchanged")
    p.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    _sparsity_arguments(p)
    p.add_argument("--max-length", type=int, help="new max_position_embeddings (relative-position models only "
                   "beyond the source's length)")
    p.add_argument("--max-relative-positions", type=int, help="re-bucket relative positions over this span "
                   "(changes the function; default keeps the source's)")
    p.add_argument("--allow-missing", action="store_true", help="initialise target weights absent from the source")
    p.add_argument("--allow-unused", action="store_true", help="leave source tensors with no target behind")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("layout", help="draw the attention pattern of a config")
    p.add_argument("--config", help="a model preset (configs/model/*.yaml), config.json or checkpoint folder "
                   "(default: the base 4,096-token config)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens to draw (at most the model's "
                   "max_position_embeddings and 1,024 blocks)")
    p.add_argument("--max-length", type=int, help="max_position_embeddings of the drawn model (default: the "
                   "config's); random blocks are drawn over it")
    p.add_argument("--out", default="layout.png")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, help="one head (default: all heads as a grid)")
    p.add_argument("--num-heads", type=int)
    p.add_argument("--random-seed", type=int)
    _sparsity_arguments(p)
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("train-tokenizer", help="train the Japanese tokenizer on text files (one line each)")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text files (UTF-8 unless --encoding "
                   "says otherwise), read line by line")
    p.add_argument("--out", required=True, help="output folder (AutoTokenizer.from_pretrained loads it)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--shrink-vocab", action="store_true", help="train with the largest vocabulary size the "
                   "corpus supports when --vocab-size is too large (default: an error naming that size)")
    p.add_argument("--pretokenize", choices=["mecab", "none"], default="mecab", help="mecab: pieces never cross "
                   "MeCab word boundaries (training time only); none: a plain unigram model")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="sample at most this many "
                   "sentences for training (bounds memory; 0: all)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--model-max-length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer files in a non-empty --out")
    _encoding_arguments(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare", help="tokenise and pack documents into fixed-length pretraining shards")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained loads it)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt (one document per "
                   "blank-line-separated block), .jsonl, .parquet (also .gz), a save_to_disk folder, or a folder")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier output with --overwrite)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0, help="recorded as the loader's default shuffle seed")
    p.add_argument("--num-workers", type=int, help="tokenising processes (default: all CPUs; 0: in-process)")
    p.add_argument("--shard-tokens", type=int, default=1 << 29, help="tokens per shard (default 512 Mi = 1 GiB "
                   "in uint16)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet", "arrow"],
                   help="input format for every input (default: by extension)")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    p.add_argument("--normalization", default="NFKC", choices=["NFKC", "none"])
    _encoding_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepare output in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--slice", metavar="I/N|auto", help="be worker I of N sharing --out (any nodes, one shared "
                   "file system); 'auto': I, N from srun / torchrun / mpirun. The last worker to finish merges")
    p.add_argument("--merge", action="store_true", help="pack nothing: merge the slices the workers finished")
    p.add_argument("--slice-bytes", type=int, default=1 << 30, help="input bytes (whole files) per slice, the "
                   "unit of parallel and resumed work (default 1 GiB; part of what decides the output bytes)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="MLM pretraining on DeepSpeed (one process, deepspeed, torchrun, mpirun, srun)",
                       allow_abbrev=False,  # with run-config overrides, a prefix of an option must not pass for it
                       description="Pretrain from a run preset; further arguments --section.key=value override it "
                       "(e.g. --train.max_steps=100 --zero.stage=2).")
    p.add_argument("--config", required=True, help="run preset (configs/pretrain/*.yaml) or a saved config.yaml")
    p.add_argument("--resume", default="none", help="none (default; refuses a folder that holds checkpoints), auto "
                   "(this run's newest complete checkpoint, else a fresh start) or a checkpoint folder (another "
                   "run's: a fork, with a new run id, into a folder of its own)")
    p.add_argument("--dry-run", action="store_true", help="run the preflight checks, print the resolved config and "
                   "DeepSpeed JSON, train nothing")
    p.set_defaults(func=cmd_pretrain, takes_overrides=True)

    p = sub.add_parser("plan", help="memory, step time and cost of a pretraining run on N GPUs, before booking them",
                       description="A table over ZeRO 0-3 x activation checkpointing at the largest micro-batch that "
                       "fits: memory per GPU, step time, tokens/s, MFU, scaling, days and GPU-hours; the model is "
                       "written in bigbird_ja/training/planner/.")
    p.add_argument("--model", default="configs/model/base-4096.yaml", help="model preset, config.json or "
                   "checkpoint folder (e.g. a `bigbird-ja convert` output)")
    p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE", help="a BigBirdJaConfig "
                   "field laid over --model (e.g. attention_type=full); repeatable")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--gpu", default="a100-80gb", help="a100-40gb, a100-80gb, h100, h200, or any name with all "
                   "four of --memory-gib --peak-tflops --intra-node-gbps --inter-node-gbps")
    p.add_argument("--memory-gib", type=float)
    p.add_argument("--peak-tflops", type=float, help="dense peak in the run's precision")
    p.add_argument("--intra-node-gbps", type=float, help="all-reduce bus bandwidth within a node, GB/s")
    p.add_argument("--inter-node-gbps", type=float, help="one node's network bandwidth to the others, GB/s")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tokens", type=float, help="token budget of the run (e.g. 48e9)")
    p.add_argument("--global-batch", type=int, default=2048, help="target sequences per optimizer step (the "
                   "accumulation is rounded to the nearest whole number)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--micro-batch", type=int, help="evaluate this micro-batch (default: the largest that fits)")
    p.add_argument("--compute-efficiency", type=float, default=0.40, help="fraction of peak the kernels reach "
                   "(default 0.40; measure it with benchmarks/run_gpu_suite.sh)")
    p.add_argument("--json-out", metavar="FILE", help="write the table as JSON")
    p.add_argument("--write", metavar="FILE", help="write the recommended setting as a pretraining preset")
    p.add_argument("--base-preset", default="configs/pretrain/base-4096-multinode.yaml", help="the preset --write "
                   "starts from (data, optimizer, checkpoints)")
    p.add_argument("--update-headers", action="store_true", help="rewrite the planner's block in the header of "
                   "every preset with a `# plan-args:` line, then exit")
    p.add_argument("--presets", default="configs/pretrain", help="folder of presets for --update-headers")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="a pretraining checkpoint as a save_pretrained folder")
    p.add_argument("checkpoint", help="a step-NNNNNNNN folder, a checkpoint folder or a run folder (newest complete)")
    p.add_argument("out", help="output folder (AutoModelForMaskedLM.from_pretrained loads it)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("export-onnx", help="a save_pretrained folder as one ONNX graph (dynamic batch and length)",
                       description="Check the folder against its checksums.json, write its model (its head from "
                       "config.json) as ONNX with a dynamic batch and sequence length (1 to max_position_embeddings "
                       "tokens; longer inputs are refused by the graph itself) and, with onnxruntime installed, "
                       "compare it with PyTorch; the file appears only if they agree.")
    p.add_argument("model", help="a save_pretrained folder (bigbird-ja export / convert / a fine-tuned model/)")
    p.add_argument("out", help="the .onnx file to write (not a directory)")
    p.add_argument("--check-lengths", type=int, nargs="+", metavar="N", help="lengths to compare at, 1 to "
                   "max_position_embeddings (default: one padded inside the graph and three that are not multiples "
                   "of the block size)")
    p.add_argument("--opset", type=int, help="ONNX opset, 18 or more (default: the exporter's)")
    p.set_defaults(func=cmd_export_onnx)

    tasks = _TaskNames()
    p = sub.add_parser("finetune", help="fine-tune and evaluate on a JGLUE task or the long-range QA task",
                       allow_abbrev=False,  # --train (a section) must not pass for --train-file
                       description="Fine-tune, then predict and score the validation file; further arguments "
                       "--section.key=value override the config (e.g. --train.epochs=3 --data.max_length=1024). Several "
                       "processes: start it under deepspeed / torchrun / mpirun / srun with --train.deepspeed=true.")
    p.add_argument("task", choices=tasks)
    p.add_argument("--config", help="fine-tune preset (configs/finetune/*.yaml); default: the built-in defaults")
    p.add_argument("--model", help="checkpoint folder to start from (model.init_from); a preset may instead train "
                   "model.preset from scratch")
    p.add_argument("--train-file", metavar="FILE", help="training file in the task's JGLUE format (data.train)")
    p.add_argument("--valid-file", metavar="FILE", help="validation file (data.valid)")
    p.add_argument("--out", metavar="DIR", help="output folder (output.dir)")
    p.set_defaults(func=cmd_finetune, takes_overrides=True)

    p = sub.add_parser("evaluate", help="score predictions (or a fine-tuned model) on a JGLUE data file",
                       allow_abbrev=False,
                       description="With --predictions: score a predictions file (one JSON object id -> answer "
                       "text for jsquad) against --data and report missing and unknown ids. With --model: run a "
                       "fine-tuned model over --data (--section.key=value overrides apply).")
    p.add_argument("task", choices=tasks)
    p.add_argument("--data", required=True, help="gold data file in the task's JGLUE format")
    p.add_argument("--predictions", help="predictions file: one JSON object mapping id to prediction")
    p.add_argument("--model", help="fine-tuned model folder (with its tokenizer)")
    p.add_argument("--config", help="fine-tune preset for --model runs (data and eval sections)")
    p.add_argument("--metrics-out", metavar="FILE", help="write the metrics here as JSON")
    p.add_argument("--predictions-out", metavar="FILE", help="--model runs: write the predictions here as JSON")
    p.add_argument("--retrieval", action="store_true", help="jsquad: rank every article of --data for each question "
                   "by embedding (mean pooling) and report recall@k and MRR (bigbird_ja.embeddings)")
    p.add_argument("--max-length", type=int, help="--retrieval: tokens per window (default: the model's length)")
    p.add_argument("--truncate-to", type=int, help="--retrieval: read only each article's first N tokens")
    p.set_defaults(func=cmd_evaluate, takes_overrides=True)
    return parser


def _refuse_unknown_options(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> None:
    """Arguments argparse did not know are run-config overrides (--section.key=value); an --option without a dot
    is a misspelt or renamed option, refused with the closest real one."""
    subcommand = parser.subcommands[command]
    options = [o for o in subcommand._option_string_actions if o.startswith("--")]  # argparse has no public list
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "." not in name:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the options are {', '.join(sorted(options))}"
            subcommand.error(f"unrecognized option {name}{hint} (run-config overrides are --section.key=value)")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What `main` reports in one line with exit status 2: conditions the user fixes (the message names the fix).
    A RuntimeError is not one of them (CUDA out of memory, NCCL failures and bugs keep their traceback), except the
    preflight checks' own PreflightError, the trainer's TrainingStopped (non-finite values, out of memory) and a full
    disk while checkpointing: their messages say what happened and what to change. Of the other OSErrors, those
    about a path the user gave (missing, not writable, a folder for a file or the reverse) are the user's to fix; the
    project's writers (`common.atomic_io`) word them to name the path and the fix."""
    from .training.checkpoint import CheckpointDiskFullError
    from .training.preflight import PreflightError
    from .training.trainer import TrainingStopped

    from .common.checksums import DamagedFolderError

    return (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError,
            PreflightError, TrainingStopped, CheckpointDiskFullError, DamagedFolderError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        _refuse_unknown_options(parser, args.command, extra)
    args.overrides = extra  # --section.key=value for subcommands that take run-config overrides
    try:
        return args.func(args)
    except _user_errors() as err:  # evaluated only when something was raised
        print(f"bigbird-ja {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
