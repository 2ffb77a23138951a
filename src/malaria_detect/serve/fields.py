"""`POST /smear`: whole thin-smear fields -> every red cell classified, counts, parasitemia.

Answers the `malaria-detect smear --json` format: {"fields": [...], "summary": {...}}; one field
record per upload, in upload order, each with its own `error` when its file cannot be used (the
other fields are still analysed). With `overlay=true` each field also gets `overlay`, the annotated
field as a JPEG data URL.

Limits (environment variables, like /predict's): MALARIA_DETECT_MAX_FIELDS files per request (8),
MALARIA_DETECT_MAX_FIELD_BYTES per file (8 MiB; 8 fields of 8 MiB fit the 64 MiB request cap),
MALARIA_DETECT_MAX_FIELD_PIXELS per field (40 MP: a 1280x960 field is 1.2 MP; larger fields are
segmented in tiles) and the request's pixel budget (MALARIA_DETECT_MAX_REQUEST_PIXELS). The body is
capped as it streams by the app's UploadLimit.

The work runs in a bounded pool (pool.py): MALARIA_DETECT_FIELD_WORKERS fields at a time (half the
cores), MALARIA_DETECT_FIELD_QUEUE more waiting (8); past that 503 with Retry-After.
"""

from __future__ import annotations

import base64
import io
import os
import threading

from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from ..counting import sample_summaries, summarize
from ..imaging import ImageError, PixelBudget, open_rgb
from .pool import FieldPool
from .uploads import read_uploads, trim_heap

OVERLAY_MAX_SIDE = 1600   # the overlay in the answer is at most this many pixels wide


def _overlay_data_url(img, rec: dict, positive: str) -> str:
    from ..fields.overlay import draw_overlay

    ov = draw_overlay(img, rec, positive)
    if ov.width > OVERLAY_MAX_SIDE:
        ov = ov.resize((OVERLAY_MAX_SIDE, round(ov.height * OVERLAY_MAX_SIDE / ov.width)))
    buf = io.BytesIO()
    ov.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def add_smear_routes(app: FastAPI, settings) -> FieldPool:
    """Register POST /smear on `app`; `settings` holds the limits (the files are read by read_uploads).
    Returns the pool the fields are analysed in (app.state.field_pool)."""
    pool = app.state.field_pool = FieldPool(settings.field_workers, settings.field_queue)
    loading = threading.Lock()

    def field_predictor():
        """The model of /smear: the server's --model when one was given, else the bundled whole-field
        model ('anylab': every object, the stage), loaded with the first field: a session of its own
        even when /predict's is the same file, since the field workers share the cores (threads) and
        may run without the memory arena."""
        if settings.model:
            return app.state.predictor
        with loading:
            return _load_field_predictor()

    def _load_field_predictor():
        if getattr(app.state, "field_predictor", None) is None:
            from ..cells.predictor import Predictor
            from ..modelfile import bundled_field_model_path

            threads = max(1, (os.cpu_count() or 1) // settings.field_workers)  # the workers share the cores
            app.state.field_predictor = Predictor.load(
                bundled_field_model_path(), threads=threads,
                session_options={"enable_cpu_mem_arena": settings.field_arena})
        return app.state.field_predictor

    def analyze(names: list[str], blobs: list[bytes], overlay: bool, cell_diameter: float | None) -> list[dict]:
        # OpenCV and scikit-image load with the first field, not with the server (~64 MB)
        from ..fields.analysis import SmearOptions, analyze_field, failed_field
        from ..pictures import picture_entry

        pred = field_predictor()
        budget = PixelBudget(settings.max_request_pixels)
        opts = SmearOptions(cell_diameter=cell_diameter)
        out = []
        for name, blob in zip(names, blobs):
            try:
                img = open_rgb(blob, settings.max_field_pixels, max_side=None, budget=budget)
            except ImageError as e:
                out.append(failed_field(name, str(e), opts))
                continue
            rec = analyze_field(pred, img, name, opts)
            if overlay and "error" not in rec:
                rec["overlay"] = _overlay_data_url(img, rec, pred.record.positive)
            if settings.db_enabled and "error" not in rec:
                rec["_picture"] = picture_entry(img)  # kept with the field (store.py), not answered
            out.append(rec)
            del img
            trim_heap()  # the field's decode, masks and crops back to the OS (~50 MB less held after a burst)
        return out

    @app.post("/smear", summary="analyse whole field images: every red cell, counts and parasitemia",
              responses={413: {"description": "upload too large or too many files"},
                         415: {"description": "no file of a supported image type"},
                         422: {"description": "malformed request (no 'files' field)"},
                         503: {"description": "busy: every field worker and queue place is taken; "
                                              "try again after the Retry-After header's seconds"}})
    async def smear(files: list[UploadFile] = File(..., description="field images: jpg, png, tif, webp, bmp"),
                    overlay: bool = Query(False, description="add each annotated field as a JPEG data URL"),
                    cell_diameter: float | None = Query(None, ge=6, le=2000, allow_inf_nan=False,
                                                        description="red-cell diameter in pixels (default: "
                                                                    "estimated from each field)"),
                    sample: str | None = Query(None, min_length=1, max_length=200,
                                               description="the sample (slide, patient) these fields belong to: "
                                                           "each field carries it, `samples` pools it")):
        if sample is not None:
            from ..store import StoreError, check_sample_id

            try:
                sample = check_sample_id(sample)
            except StoreError as e:
                raise HTTPException(422, str(e)) from None
        n = min(len(files), settings.max_fields)  # more files: read_uploads answers 413
        pool.reserve(n)                            # or 503 with Retry-After: the pool is full
        try:
            uploads = await read_uploads(files, max_files=settings.max_fields, max_bytes=settings.max_field_bytes,
                                         what="fields", unnamed="field", formats="jpg, png, tif, webp or bmp")
        except BaseException:
            pool.release(n)
            raise
        good = [i for i, u in enumerate(uploads) if u.error is None]
        # the pool gives the n slots back when the work is done
        done = await pool.run(n, analyze, [uploads[i].name for i in good], [uploads[i].data for i in good],
                              overlay, cell_diameter)
        from ..fields.analysis import failed_field

        # by upload position, never by name; a file of another type has its own error
        fields = [None if u.error is None else failed_field(u.name, u.error) for u in uploads]
        for i, rec in zip(good, done):
            fields[i] = rec
        for rec in fields:
            rec["sample"] = sample
        out = {"fields": fields, "summary": summarize(fields, target_cells=settings.target_cells),
               "samples": sample_summaries(fields, target_cells=settings.target_cells)}
        from ..fields.analysis import model_entry
        from .samples import save_report

        pictures = [rec.pop("_picture", None) for rec in fields]
        warning = save_report(settings, out | {"model": model_entry(field_predictor())}, pictures)
        return out | ({"warning": warning} if warning else {})

    return pool
