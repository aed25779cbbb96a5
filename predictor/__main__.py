"""Entry point: ``python -m predictor --model_name sd [--model_id ...]``."""

from __future__ import annotations

import logging
import os
import sys

from predictor.config import parse_settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("predictor")

    if settings.compile:
        # Before torch is imported: inductor and triton read their cache locations from the environment.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = settings.compile_cache_dir
        os.environ["TRITON_CACHE_DIR"] = os.path.join(settings.compile_cache_dir, "triton")

    from predictor.model import DiffusionModel
    from predictor.server import PredictorServer

    model = DiffusionModel(settings)
    try:
        model.load()
    except Exception as exc:
        logger.error("failed to load model '%s': %s", settings.model_name, exc, exc_info=logger.isEnabledFor(10))
        return 1
    server = PredictorServer(settings, http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc)
    server.serve(model)
    logger.info("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
