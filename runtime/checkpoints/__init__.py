"""Checkpoints that quantrt did not write, loaded into quantrt's formats: optimum-quanto folders, torchao
safetensors folders, single-file checkpoints in a model's original (non-diffusers) layout, and unquantized
model folders quantized while they load.

    QuantizedTransformer.from_pretrained("flux-quanto-int4")        # quanto: routed here (foreign_format)
    QuantizedTransformer.from_pretrained("flux-torchao-int8")       # torchao safetensors: routed here
    QuantizedTransformer.from_pretrained("FLUX.1-dev/transformer", quantization="int8wo")  # quantize-on-load
    QuantizedTransformer.from_single_file("flux1-dev.safetensors", quantization="int8wo")
    QuantizedTransformer.from_single_file("flux1-dev-Q4_K_S.gguf", config="FLUX.1-dev/transformer")  # as stored

Nothing is requantized where a stored format maps: each quanto / torchao weight is converted into the
quantrt scheme that stores the same numbers, and a weight that does not map is refused with an error naming
the layer and the reason. Nothing is executed: safetensors, GGUF and JSON only (torchao's metadata is read as
JSON, no torchao object is rebuilt), and neither quanto nor torchao needs to be installed to load.

    routing       which loader a folder goes to (foreign_format, load_foreign, model_weight_files)
    reader        SafetensorsReader (plain reads, not safe_open's memory map, so that the pages a streaming
                  loader has read do not stay resident), ShardedReader, release_freed_memory
    common        a model folder's files and skeleton; putting converted tensors into the skeleton
    on_load       quantize-on-load of an unquantized folder (quantize_folder)
    quanto        optimum-quanto conversion, with its table of quanto qtypes
    torchao       torchao conversion
    single_file   single-file FLUX (quantize_single_file, single_file_plan, single_file_layout)
    gguf          GGUF files (GgufFile, load_gguf_file), their block types as quantrt's GGUF formats, as stored

`reader` is the lowest layer of file reading (quantrt.serialization builds on it), so this package's
`__init__` imports nothing: importing the reader must not import the loaders, which build on serialization.
"""
