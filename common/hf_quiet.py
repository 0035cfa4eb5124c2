"""Silence diffusers' and transformers' loading chatter: our tools print their own progress and errors."""


def quiet_hf_libraries() -> None:
    """Errors only, no progress bars, from both Hugging Face libraries (imported here, lazily)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
