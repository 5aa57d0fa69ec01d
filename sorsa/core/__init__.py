"""The adapter library that `import sorsa` loads, and nothing else of the project: the SORSA math (functional),
SORSALinear (layer), apply / merge / unmerge / disable (model), the target rule (targets), the adapter file format
(adapter_io), the SVD cache, quantized residuals (quant, quant_model), SORSAConfig (config), and the shared
utilities every other package uses (errors, dtypes, fileio, records, distributed)."""
