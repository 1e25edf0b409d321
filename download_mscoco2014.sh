#!/usr/bin/env bash
# Download MS-COCO 2014 train images (used by RefCOCO/+/g) into the layout train_hivg.py expects:
#   $DATA_ROOT/other/images/mscoco/images/train2014
# Usage: bash download_mscoco2014.sh [DATA_ROOT]   (default ./data/image_data)
set -euo pipefail
DATA_ROOT=${1:-${DATA_ROOT:-./data/image_data}}
DEST=$DATA_ROOT/other/images/mscoco/images
mkdir -p "$DEST"
cd "$DEST"
if [ -d train2014 ] && [ -n "$(ls -A train2014)" ]; then
    echo "$DEST/train2014 already exists; nothing to do"
    exit 0
fi
curl -fL -C - -o train2014.zip http://images.cocodataset.org/zips/train2014.zip
unzip -q train2014.zip
rm train2014.zip
echo "COCO 2014 train images in $DEST/train2014 ($(ls train2014 | wc -l) files); pass --data_root $DATA_ROOT"
