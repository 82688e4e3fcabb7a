"""Text in: evaluation text (text) and calibration sets with llama.cpp's windows and BOS rule (calibration)."""
