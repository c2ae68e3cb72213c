"""fiftyone-nola."""
