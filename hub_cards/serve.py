"""Serve a transformers-native folder with `transformers serve` and ask it once, as a user's client would.

    python -m hybrid_mamba.hub_cards.serve --model runs/tiny-bamba [--prompt TEXT] [--tokens 40] [--chat]

Starts `transformers serve MODEL` on a free localhost port, sends one greedy `/v1/completions` request
(`/v1/chat/completions` with --chat) through the `openai` client, prints the answer and stops the
server. A hybrid_mamba folder is served through its Bamba export (`python -m hybrid_mamba.modeling.convert
--to bamba`): the server only loads classes of transformers itself. Needs the serving extra
(`pip install -e ".[serving]"`).
"""

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_mamba.common.args import parse_args
from hybrid_mamba.common.serving import check_servable, serve

logger = logging.getLogger(__name__)


@dataclass
class ServeArgs:
    model: str = field(metadata={"help": "A save_pretrained folder of a transformers class (e.g. the Bamba export)."})
    prompt: str = field(default="To be, or not to be", metadata={"help": "The prompt (the user message with --chat)."})
    tokens: int = field(default=40, metadata={"help": "New tokens to generate (greedy)."})
    chat: bool = field(default=False, metadata={"help": "Ask /v1/chat/completions with the folder's chat template."})
    device: str = field(default="cpu", metadata={"help": "`transformers serve --device`."})
    startup_timeout: float = field(default=180.0, metadata={"help": "Seconds to wait for the server to answer."})

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"--tokens must be at least 1, got {self.tokens}.")
        check_servable(self.model)


def ask_once(args: ServeArgs, log_path: Path) -> str:
    """The server's greedy answer to `args.prompt`."""
    try:
        import openai
    except ImportError as err:
        raise ImportError('Serving needs the serving extra: pip install -e ".[serving]"') from err
    with serve(args.model, log_path, device=args.device, startup_timeout=args.startup_timeout) as url:
        client = openai.OpenAI(base_url=url, api_key="none", timeout=600, max_retries=0)
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            reply = client.chat.completions.create(
                model=args.model, messages=messages, max_tokens=args.tokens, temperature=0
            )
            return reply.choices[0].message.content
        reply = client.completions.create(model=args.model, prompt=args.prompt, max_tokens=args.tokens, temperature=0)
        return reply.choices[0].text


def main(argv=None):
    args = parse_args(ServeArgs, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = Path(tempfile.gettempdir()) / f"hybrid-mamba-serve-{os.getpid()}.log"  # kept: named in any error
    text = ask_once(args, log)
    route = "/v1/chat/completions" if args.chat else "/v1/completions"
    print(f"transformers serve {args.model} {route}: {args.prompt!r} -> {text!r}")


if __name__ == "__main__":
    from hybrid_mamba.common.cli import run_main

    run_main(main)
