"""What goes into a model: the tokenizer, image preprocessing and the processor that joins them."""
