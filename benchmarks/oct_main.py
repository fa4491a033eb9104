"""``python -m open_clip_train.main`` with clipft's embedded tiny model configs
registered first (open_clip does not know ``tiny-vit``); everything else is
open_clip_train's own code and arguments."""
import sys

from clipft.models import register_tiny_configs

register_tiny_configs()

from open_clip_train.main import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
