"""The Shapes application on the generic engine: text-to-image scored by the exact pixel oracle, reconstruction
through the codes, question answering and codebook usage (``evaluate``)."""
