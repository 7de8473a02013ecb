"""Evaluation: μ-RegPro metrics, QC verdicts, pictures and the per-split evaluation."""
