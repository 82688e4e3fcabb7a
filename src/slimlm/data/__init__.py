"""Text in: evaluation text sources (text) and calibration sets with llama.cpp's windows and BOS rule
(calibration)."""
