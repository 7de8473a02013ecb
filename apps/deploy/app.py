"""MONAI Deploy application: register a moving NIfTI image to a fixed one, files in, files out.

    python apps/deploy/app.py -i INPUT_FOLDER -o OUTPUT_FOLDER [-m MODEL_PATH]

INPUT_FOLDER holds moving.nii.gz and fixed.nii.gz (optional: moving_labels, moving_mask, fixed_mask);
the output folder receives the files of ``scripts.inference.registrar.Registrar.register``. See ``docs/deploy.md``.
The flags (and HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH) are the SDK's own.
"""

import logging
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# In a checkout the bundle root (scripts/, configs/) is two levels up; in a packaged app it is on PYTHONPATH.
if (_HERE.parents[1] / "scripts" / "pipeline.py").is_file():
    sys.path.insert(0, str(_HERE.parents[1]))
sys.path.insert(0, str(_HERE))

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402
from registration_operator import RegistrationOperator  # noqa: E402


class RegistrationApp(Application):
    """One operator, run once: :class:`RegistrationOperator` on the SDK's input, output and model paths."""

    def compose(self):
        context = Application.init_app_context(self.argv)  # parses -i/-o/-m and the HOLOSCAN_* variables
        logging.getLogger(__name__).info(
            "input %s, output %s, model %s", context.input_path, context.output_path, context.model_path
        )
        self.add_operator(
            RegistrationOperator(
                self,
                CountCondition(self, 1),
                name="registration",
                input_folder=context.input_path,
                output_folder=context.output_path,
                model_path=context.model_path,
            )
        )


def main() -> None:
    RegistrationApp().run()


if __name__ == "__main__":
    main()
