"""``serfswap generate OUT.onnx --tokenizer DIR "prompt" ...``: greedy generation with a file
exported with ``--task text-generation-with-past``, on onnxruntime; prints each continuation.
``serfswap generate OUTDIR "text" ...`` does the same with a folder exported with a seq2seq task
(a translation, a summary), and ``serfswap generate OUTDIR speech.wav ...`` with Whisper's.

One module per command, as the others: ``add_command`` declares its arguments, ``run`` runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, first_line, install_hint


def add_command(commands: Any) -> None:
    """The ``generate`` subcommand on ``commands`` (argparse's subparsers)."""
    gen = commands.add_parser(
        "generate",
        help="greedy generation on onnxruntime with a text-generation-with-past export "
        "(or a seq2seq export's folder)",
        description="Continue each PROMPT greedily with an ONNX file exported with "
        "--task text-generation-with-past (KV cache), on onnxruntime's CPU; prints one "
        "continuation per prompt. Prompts of different lengths run as one left-padded batch. "
        "With a folder exported with --task text2text-generation-with-past, prints the "
        "model's output for each PROMPT (a translation, a summary); with "
        "automatic-speech-recognition-with-past (Whisper), each PROMPT is a WAV file (16-bit "
        "PCM at the feature extractor's rate) and the transcript is printed.",
    )
    gen.add_argument("model", metavar="MODEL.onnx", help="the exported decoder, or seq2seq folder")
    gen.add_argument("prompts", metavar="PROMPT", nargs="+",
                     help="the text to continue (a WAV file for Whisper)")  # fmt: skip
    gen.add_argument("--tokenizer", metavar="DIR",
                     help="the model's HuggingFace tokenizer folder (default for a seq2seq "
                     "folder: the folder itself, where export copies the model's)")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    gen.add_argument("--trust-remote-code", action="store_true",
                     help="allow a tokenizer that needs its folder's own code")  # fmt: skip
    gen.set_defaults(func=run)


def _tokenizer(directory: Path, trust_remote_code: bool) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        message = f"--tokenizer needs transformers ({install_hint('hf')})"
        raise InvalidArgumentError(message, option="--tokenizer") from None
    from ..io.remote_code import check_tokenizer_folder, never_ask

    # a sub-folder's auto_map too (transformers would ask on stdin), and no FIFO
    hint = "If you trust it, pass --trust-remote-code"
    check_tokenizer_folder(directory, hint, trust_remote_code=trust_remote_code)
    never_ask()
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            f"no tokenizer in {directory} ({first_line(exc)})", option="--tokenizer"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Continue each prompt greedily and print the continuations."""
    from ..io.paths import check_input_path
    from ..onnx_ops import generate, session

    model = check_input_path(args.model)
    if args.max_new_tokens < 1:
        raise InvalidArgumentError("--max-new-tokens must be at least 1", option="--max-new-tokens")
    if model.is_dir():
        from .generate_seq2seq import generate_from_folder

        return generate_from_folder(args, model, _tokenizer)
    if args.tokenizer is None:
        args.parser.error("the following arguments are required: --tokenizer")
    tokenizer = _tokenizer(Path(args.tokenizer), args.trust_remote_code)
    tokenizer.padding_side = "left"  # new tokens follow every prompt's last real token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(args.prompts, padding=True, return_tensors="np")
    tokens = generate(
        session(model, "cpu"), batch["input_ids"], batch["attention_mask"],
        max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    prompt_length = batch["input_ids"].shape[1]
    for row in tokens[:, prompt_length:]:
        print(tokenizer.decode(row, skip_special_tokens=True))
    return 0
