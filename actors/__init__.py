# Library noise silenced at its source in every process that runs this package's code (common/quiet.py), before
# vLLM or transformers are imported.
from common.quiet import quiet_libraries

quiet_libraries()
