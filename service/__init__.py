"""autoq's job service: quantization as a REST API. Start it with ``service.main.serve()``."""
