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
"""

from __future__ import annotations

import base64
import io

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool

from ..imaging import ImageError, PixelBudget, open_rgb

OVERLAY_MAX_SIDE = 1600   # the overlay in the answer is at most this many pixels wide


def _overlay_data_url(img, rec: dict, positive: str) -> str:
    from ..fields.overlay import draw_overlay

    ov = draw_overlay(img, rec, positive)
    if ov.width > OVERLAY_MAX_SIDE:
        ov = ov.resize((OVERLAY_MAX_SIDE, round(ov.height * OVERLAY_MAX_SIDE / ov.width)))
    buf = io.BytesIO()
    ov.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def add_smear_routes(app: FastAPI, settings, supported) -> None:
    """Register POST /smear on `app`; `settings` holds the limits, `supported(upload)` the type rule."""

    def field_predictor():
        """The model of /smear: the server's --model when one was given, else the bundled robust
        model (trained on two labs' cells), loaded with the first field."""
        if settings.model:
            return app.state.predictor
        if getattr(app.state, "field_predictor", None) is None:
            from ..cells.predictor import Predictor
            from ..modelfile import bundled_field_model_path

            app.state.field_predictor = Predictor.load(bundled_field_model_path())
        return app.state.field_predictor

    def analyze(names: list[str], blobs: list[bytes], overlay: bool, cell_diameter: float | None) -> list[dict]:
        # OpenCV and scikit-image load with the first field, not with the server (~64 MB)
        from ..fields.analysis import SmearOptions, analyze_field, failed_field

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
            out.append(rec)
            del img
        return out

    @app.post("/smear", summary="analyse whole field images: every red cell, counts and parasitemia",
              responses={413: {"description": "upload too large or too many files"},
                         415: {"description": "no file of a supported image type"},
                         422: {"description": "malformed request (no 'files' field)"}})
    async def smear(files: list[UploadFile] = File(..., description="field images: jpg, png, tif, webp, bmp"),
                    overlay: bool = Query(False, description="add each annotated field as a JPEG data URL"),
                    cell_diameter: float | None = Query(None, ge=6, le=2000,
                                                        description="red-cell diameter in pixels (default: "
                                                                    "estimated from each field)")):
        if len(files) > settings.max_fields:
            raise HTTPException(413, f"too many fields: {len(files)} (limit {settings.max_fields} per request)")
        if not any(supported(f) for f in files):
            kinds = ", ".join(sorted({f.content_type or "unknown" for f in files}))
            raise HTTPException(415, f"unsupported file type ({kinds}); send jpg, png, tif, webp or bmp images")
        names, blobs, bad = [], [], {}
        for i, f in enumerate(files):
            name = f.filename or f"field{i}"
            data = await f.read(settings.max_field_bytes + 1)
            if len(data) > settings.max_field_bytes:
                raise HTTPException(413, f"{name}: file too large (limit {settings.max_field_bytes:,} bytes)")
            names.append(name)
            blobs.append(data)
            if not supported(f):
                bad[i] = f"unsupported file type {f.content_type!r}"
        good = [i for i in range(len(files)) if i not in bad]
        done = await run_in_threadpool(analyze, [names[i] for i in good], [blobs[i] for i in good], overlay,
                                       cell_diameter)
        from ..counting import summarize
        from ..fields.analysis import failed_field

        fields: list[dict] = [None] * len(files)  # by upload position, never by name
        for i, rec in zip(good, done):
            fields[i] = rec
        for i, msg in bad.items():
            fields[i] = failed_field(names[i], msg)
        return {"fields": fields, "summary": summarize(fields)}
