"""Renditions through the serving path: write a real DX file, read it back as the daemon does.

The model package renders training images as stored values plus attributes
(:func:`model.renditions.render`) but never imports pydicom; this adapter encodes them as
a PS3.10 Digital X-Ray Image file (For Presentation, PS3.3 A.26), decodes it with
:func:`dicom_io.reader.read_image` and maps it with :func:`daemon.pipeline.model_input`,
exactly the path of a received instance.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from daemon.pipeline import model_input
from dicom_io.reader import read_image
from model.pixels import PixelMeta
from model.renditions import Rendition


def _voi_module(ds: Dataset, rendition: Rendition) -> None:
    """Set the VOI LUT module (PS3.3 C.11.2): a window or a VOI LUT Sequence item."""
    if rendition.window_center is not None and rendition.window_width is not None:
        ds.WindowCenter = f"{rendition.window_center:.2f}"
        ds.WindowWidth = f"{rendition.window_width:.2f}"
        ds.VOILUTFunction = rendition.voi_lut_function
    if rendition.voi_lut_descriptor is not None and rendition.voi_lut_data is not None:
        item = Dataset()
        item.LUTDescriptor = list(rendition.voi_lut_descriptor)
        item.LUTExplanation = "radflag rendition test LUT"
        item.LUTData = rendition.voi_lut_data.astype("<u2").tobytes()
        ds.VOILUTSequence = Sequence([item])


def to_dataset(rendition: Rendition) -> Dataset:
    """Encode ``rendition`` as a DX For Presentation dataset (PS3.3 A.26, C.8.11).

    Parameters
    ----------
    rendition
        From :func:`model.renditions.render`.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PresentationIntentType = "DX", "FOR PRESENTATION"
    ds.PatientID, ds.PatientName = "RENDITION", "Rendition^Test"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["L", "F"]  # PA view: columns to the patient's left, rows to feet
    ds.ImageLaterality, ds.Manufacturer = "U", "radflag-renditions"
    ds.ContentDate, ds.ContentTime = "20240101", "120000"
    ds.DetectorType, ds.BurnedInAnnotation, ds.LossyImageCompression = "DIRECT", "NO", "00"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    rows, columns = rendition.pixels.shape
    ds.Rows, ds.Columns = int(rows), int(columns)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, rendition.photometric
    ds.BitsAllocated, ds.BitsStored = 16, rendition.bits_stored
    ds.HighBit, ds.PixelRepresentation = rendition.bits_stored - 1, 0
    ds.RescaleSlope = f"{rendition.rescale_slope:g}"
    ds.RescaleIntercept = f"{rendition.rescale_intercept:g}"
    ds.RescaleType = "US"
    if rendition.pixel_padding_value is not None:
        ds.PixelPaddingValue = rendition.pixel_padding_value
    _voi_module(ds, rendition)
    ds.PixelData = rendition.pixels.astype("<u2").tobytes()
    return ds


def read_through_dicom(rendition: Rendition) -> tuple[npt.NDArray[Any], PixelMeta]:
    """Write ``rendition`` as a DICOM file and read it back through the serving path.

    Parameters
    ----------
    rendition
        From :func:`model.renditions.render`.

    Returns
    -------
    tuple
        (pixels, PixelMeta) as :class:`daemon.pipeline.Pipeline` hands them to the model.
    """
    with tempfile.TemporaryDirectory(prefix="radflag-rendition-") as tmp:
        path = Path(tmp) / "rendition.dcm"
        to_dataset(rendition).save_as(path, enforce_file_format=True)
        image = read_image(path)
    return model_input(image)
