"""The benchmark's sections, by name: each starts its worker groups, measures, and adds its table to
the report (one module per section)."""

from loom.launch.bench.section_data import section_data
from loom.launch.bench.section_generate import section_generate
from loom.launch.bench.section_gpu import section_gpu
from loom.launch.bench.section_interleaved import section_interleaved
from loom.launch.bench.section_layouts import section_layouts
from loom.launch.bench.section_peers import section_peers
from loom.launch.bench.section_scaling import section_scaling
from loom.launch.bench.section_sequence import section_sequence
from loom.launch.bench.section_techniques import section_techniques
from loom.launch.bench.section_zero import section_zero

SECTIONS = {
    "peers": section_peers,
    "techniques": section_techniques,
    "layouts": section_layouts,
    "interleaved": section_interleaved,
    "zero": section_zero,
    "sequence": section_sequence,
    "data": section_data,
    "gpu": section_gpu,
    "generate": section_generate,
    "scaling": section_scaling,
}
