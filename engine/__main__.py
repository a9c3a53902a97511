"""Generate images from the command line with the same worker the RunPod handler runs.

    python -m engine --prompt "a red fox" --steps 20 --out outputs
    python -m engine --prompt "a watercolor fox" --image photo.jpg --strength 0.6
    python -m engine --prompt "a red hat" --image photo.jpg --mask mask.png

Writes the images (named by time and seed, so earlier ones are kept) and prints their
paths and the response's metrics as JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.common.metrics import ColdStart
from engine.serving.worker import Worker
from engine.settings import load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red fox in the snow, golden hour")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--scheduler")
    parser.add_argument("--format", dest="output_format", default="png", choices=["png", "jpeg", "webp"])
    parser.add_argument("--image", help="image-to-image input: a local file or an http(s) URL")
    parser.add_argument("--strength", type=float, help="with --image: how much of it is re-noised (0-1]")
    parser.add_argument("--mask", help="with --image, inpainting: a local file or URL, white repaints, black keeps")
    parser.add_argument("--input", help="a whole job input as JSON; overrides the options above")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    return parser.parse_args(argv)


def job_input(args: argparse.Namespace) -> dict:
    if args.input:
        return json.loads(args.input)
    fields = ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "guidance_scale", "seed")
    payload = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    payload.update(num_images=args.num_images, output_format=args.output_format)
    if args.scheduler:
        payload["scheduler"] = args.scheduler
    for field in ("image", "mask"):
        value = getattr(args, field)
        if value:
            local = Path(value)
            payload[field] = base64.b64encode(local.read_bytes()).decode() if local.is_file() else value
    if args.strength is not None:
        payload["strength"] = args.strength
    return payload


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: generate(args))


def generate(args: argparse.Namespace) -> int:
    cold_start = ColdStart()
    cold_start.mark("import")
    settings = load_settings()
    configure_logging(settings.log_level)
    worker = Worker(settings, cold_start)
    response = worker.handle({"id": "cli", "input": job_input(args)})
    if response["status"] != "success":
        print(json.dumps(response, indent=2), file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for item in response["output"]:
        path = args.out / f"{stamp}-seed{item['seed']}.{item['format']}"
        path.write_bytes(base64.b64decode(item["image"]))
        paths.append(str(path))
    print(json.dumps({"images": paths, "metrics": response["metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
