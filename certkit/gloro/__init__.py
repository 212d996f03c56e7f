# certkit.models registers the gloro-* architectures from certkit.gloro.archs, and certkit.gloro.lipschitz
# needs certkit.models.layers: entering through certkit.models first keeps that loop in one order, whichever
# module (certkit.methods, certkit.gloro.objective) a program imports first
import certkit.models  # noqa: F401
