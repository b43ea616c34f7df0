//! Reading and writing survey datasets on disk, because the parsers in [`crate::data`] are
//! pure (text in, [`Survey`] out) and something has to find the files, read them, and pick
//! the right parser. This is the only place survey files are touched.
//!
//! [`load`] recognizes, in this order:
//! * a directory with `survey.json`: gpo's own format ([`crate::data::native`]);
//! * a directory with `info.csv` and `*_data.json` files: one OpinionQA wave (counts layout);
//! * a directory with `American_Trends_Panel_W*` subdirectories (OpinionQA's `human_resp`):
//!   every wave, merged; other subdirectories (such as
//!   `Pew_American_Trends_Panel_disagreement_500`, which has no counts) are skipped;
//! * a `.csv` file whose header has `selections`: GlobalOpinionQA;
//! * a `.csv` file whose header has `D_H`: OpinionQA's weighted layout, with the `info.csv`
//!   of the same directory (or use [`load_weighted`] to name it).
//!
//! [`load_as`] skips detection for an explicit `--format`; [`load_with`] also takes
//! [`LoadOptions`] (which OpinionQA attributes) and returns the [`LoadReport`] of what was
//! skipped, renormalized or missing. Errors are [`DataError`]s naming the file; a file that
//! cannot be read gives `<file>: cannot read: <reason>`.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::data::opinionqa::{self, AttributeFile, DEFAULT_ATTRIBUTES};
use crate::data::{global, native, weighted, DataError, LoadReport, Survey};

/// Choices a load can take beyond the path and format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// OpinionQA counts: the attributes whose `<ATTR>_data.json` files to read (default
    /// [`DEFAULT_ATTRIBUTES`]). Those a wave lacks are named in the report.
    pub attributes: Option<Vec<String>>,
}

/// The subdirectory name prefix of an OpinionQA wave.
pub const WAVE_PREFIX: &str = "American_Trends_Panel_W";

/// A dataset layout, for an explicit `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// gpo's own directory format (`survey.json` + `answers.jsonl`).
    Native,
    /// OpinionQA counts layout: one wave directory or a `human_resp` directory of waves.
    OpinionQa,
    /// OpinionQA weighted CSV (`*_default_human.csv`) with the wave's `info.csv` beside it.
    Weighted,
    /// GlobalOpinionQA CSV.
    Global,
}

impl Format {
    /// Every format, in the order of [`Format::name`]'s documentation.
    pub const ALL: [Format; 4] = [
        Format::Native,
        Format::OpinionQa,
        Format::Weighted,
        Format::Global,
    ];

    /// The name used on the command line: `native`, `opinionqa`, `weighted`, `global`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::OpinionQa => "opinionqa",
            Format::Weighted => "weighted",
            Format::Global => "global",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        Format::ALL.into_iter().find(|f| f.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            format!("unknown dataset format `{s}`; expected one of native, opinionqa, weighted, global")
        })
    }
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

fn read(p: &Path) -> Result<String, DataError> {
    fs::read_to_string(p).map_err(|e| DataError::file(name(p), format!("cannot read: {e}")))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd =
        fs::read_dir(dir).map_err(|e| DataError::file(name(dir), format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| DataError::file(name(dir), format!("cannot read: {e}")))?;
        out.push(ent.path());
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// The wave number of an `American_Trends_Panel_W<n>` directory name.
fn wave_number(dir_name: &str) -> Option<u64> {
    dir_name.strip_prefix(WAVE_PREFIX)?.parse().ok()
}

fn wave_dirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut waves: Vec<(u64, PathBuf)> = list_dir(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| wave_number(file_name(&p)).map(|n| (n, p)))
        .collect();
    waves.sort();
    Ok(waves.into_iter().map(|(_, p)| p).collect())
}

fn has_data_json(dir: &Path) -> bool {
    list_dir(dir)
        .map(|v| v.iter().any(|p| file_name(p).ends_with("_data.json")))
        .unwrap_or(false)
}

/// The first line of a CSV file's header, split into trimmed column names.
fn csv_header(text: &str) -> Vec<String> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    match rdr.headers() {
        Ok(h) => h.iter().map(|c| c.trim().to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Works out a path's format (see the module documentation).
pub fn detect(path: &Path) -> Result<Format, DataError> {
    if path.is_dir() {
        if path.join(native::SURVEY_FILE).is_file() {
            return Ok(Format::Native);
        }
        if path.join("info.csv").is_file() && has_data_json(path) {
            return Ok(Format::OpinionQa);
        }
        if !wave_dirs(path)?.is_empty() {
            return Ok(Format::OpinionQa);
        }
        return Err(DataError::file(
            name(path),
            format!(
                "cannot tell the dataset format of this directory: expected survey.json (native), info.csv with *_data.json (an OpinionQA wave), or {WAVE_PREFIX}* subdirectories (OpinionQA human_resp)"
            ),
        ));
    }
    if !path.exists() {
        return Err(DataError::file(
            name(path),
            "cannot read: no such file or directory".to_string(),
        ));
    }
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if is_csv {
        let header = csv_header(&read(path)?);
        if header.iter().any(|c| c == "selections") {
            return Ok(Format::Global);
        }
        if header.iter().any(|c| c == "D_H") {
            return Ok(Format::Weighted);
        }
    }
    Err(DataError::file(
        name(path),
        format!(
            "cannot tell the dataset format of {}: expected a directory, or a .csv whose header has `selections` (GlobalOpinionQA) or `D_H` (OpinionQA weighted)",
            name(path)
        ),
    ))
}

/// Loads a dataset, detecting its format.
pub fn load(path: &Path) -> Result<Survey, DataError> {
    load_as(path, detect(path)?)
}

/// Loads a dataset in the given format.
pub fn load_as(path: &Path, format: Format) -> Result<Survey, DataError> {
    load_with(path, Some(format), &LoadOptions::default()).map(|(s, _)| s)
}

/// Loads a dataset in `format` (detected when `None`) with `opts`, and reports what was
/// skipped, renormalized or missing.
pub fn load_with(
    path: &Path,
    format: Option<Format>,
    opts: &LoadOptions,
) -> Result<(Survey, LoadReport), DataError> {
    let format = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    match format {
        Format::Native => Ok((load_native(path)?, LoadReport::default())),
        Format::OpinionQa => {
            let attrs: Vec<&str> = match &opts.attributes {
                Some(a) => a.iter().map(String::as_str).collect(),
                None => DEFAULT_ATTRIBUTES.to_vec(),
            };
            load_opinionqa_report(path, &attrs)
        }
        Format::Weighted => {
            let info = path.parent().unwrap_or(Path::new(".")).join("info.csv");
            if !info.is_file() {
                return Err(DataError::file(
                    name(path),
                    format!(
                        "a weighted OpinionQA CSV needs its wave's info.csv, expected at {}; name it explicitly (load_weighted)",
                        name(&info)
                    ),
                ));
            }
            load_weighted_report(path, &info)
        }
        Format::Global => {
            let text = read(path)?;
            global::parse_report(&text, &name(path))
        }
    }
}

/// Loads a native-format directory.
pub fn load_native(dir: &Path) -> Result<Survey, DataError> {
    let sp = dir.join(native::SURVEY_FILE);
    let ap = dir.join(native::ANSWERS_FILE);
    let survey = read(&sp)?;
    let answers = read(&ap)?;
    native::parse(&survey, &name(&sp), &answers, &name(&ap))
}

/// Loads OpinionQA counts with the given attributes (e.g. [`DEFAULT_ATTRIBUTES`]): `path` is
/// one wave directory, or a directory of `American_Trends_Panel_W*` waves (merged in wave
/// order). See [`load_opinionqa_report`] for attributes a wave lacks.
pub fn load_opinionqa(path: &Path, attributes: &[&str]) -> Result<Survey, DataError> {
    load_opinionqa_report(path, attributes).map(|(s, _)| s)
}

/// [`load_opinionqa`], with the report: a wave that lacks some of the attributes' files is
/// loaded from those it has, and the missing ones are named in a warning. A wave with none
/// of them is an error when it is the only one, else skipped with a warning; no wave with
/// any of them is an error.
pub fn load_opinionqa_report(
    path: &Path,
    attributes: &[&str],
) -> Result<(Survey, LoadReport), DataError> {
    if attributes.is_empty() {
        return Err(DataError::file(
            name(path),
            "no attributes to load; name at least one (e.g. SEX)",
        ));
    }
    let mut report = LoadReport::default();
    if path.join("info.csv").is_file() {
        let s = load_wave(path, attributes, &mut report)??;
        return Ok((s, report));
    }
    let waves = wave_dirs(path)?;
    if waves.is_empty() {
        return Err(DataError::file(
            name(path),
            format!(
                "no OpinionQA data in {}: expected info.csv or {WAVE_PREFIX}* subdirectories",
                name(path)
            ),
        ));
    }
    let mut surveys = Vec::new();
    let mut first_missing = None;
    for w in &waves {
        match load_wave(w, attributes, &mut report)? {
            Ok(s) => surveys.push(s),
            Err(e) => {
                report.warn(format!("{e}; wave skipped"));
                first_missing.get_or_insert(e);
            }
        }
    }
    if surveys.is_empty() {
        return Err(first_missing.expect("a wave was skipped"));
    }
    Ok((opinionqa::merge_waves(&name(path), surveys)?, report))
}

/// One wave from the attribute files it has; `Ok(Err(e))` when it has none of them.
fn load_wave(
    dir: &Path,
    attributes: &[&str],
    report: &mut LoadReport,
) -> Result<Result<Survey, DataError>, DataError> {
    let info_path = dir.join("info.csv");
    let info = read(&info_path)?;
    let mut texts = Vec::new();
    let mut missing = Vec::new();
    for a in attributes {
        let p = dir.join(format!("{a}_data.json"));
        if p.is_file() {
            texts.push((*a, name(&p), read(&p)?));
        } else {
            missing.push(*a);
        }
    }
    if texts.is_empty() {
        let first = dir.join(format!("{}_data.json", missing[0]));
        return Ok(Err(DataError::file(
            name(&first),
            format!(
                "cannot read: no counts file for any of the attributes {} in {} (choose others with --attributes)",
                missing.join(", "),
                name(dir)
            ),
        )));
    }
    if !missing.is_empty() {
        let loaded: Vec<&str> = texts.iter().map(|(a, _, _)| *a).collect();
        report.warn(format!(
            "{}: no counts files for {} (expected {}); loaded {} (choose with --attributes)",
            name(dir),
            missing.join(", "),
            missing
                .iter()
                .map(|a| format!("{a}_data.json"))
                .collect::<Vec<_>>()
                .join(", "),
            loaded.join(", ")
        ));
    }
    let files: Vec<AttributeFile> = texts
        .iter()
        .map(|(a, f, t)| AttributeFile {
            attribute: a,
            file: f,
            json: t,
        })
        .collect();
    let (s, r) = opinionqa::parse_wave_report(&name(dir), &info, &name(&info_path), &files)?;
    report.merge(r);
    Ok(Ok(s))
}

/// Loads an OpinionQA weighted CSV with its wave's `info.csv`.
pub fn load_weighted(csv: &Path, info_csv: &Path) -> Result<Survey, DataError> {
    load_weighted_report(csv, info_csv).map(|(s, _)| s)
}

/// [`load_weighted`], with the report.
pub fn load_weighted_report(
    csv: &Path,
    info_csv: &Path,
) -> Result<(Survey, LoadReport), DataError> {
    let text = read(csv)?;
    let info = read(info_csv)?;
    weighted::parse_report(&text, &name(csv), &info, &name(info_csv))
}

/// Writes a survey in gpo's native format: creates `dir` (and parents) and writes
/// `survey.json` and `answers.jsonl`.
pub fn write_native(dir: &Path, s: &Survey) -> Result<(), DataError> {
    fs::create_dir_all(dir)
        .map_err(|e| DataError::file(name(dir), format!("cannot create {}: {e}", name(dir))))?;
    let (survey, answers) = native::to_strings(s);
    for (file, text) in [
        (native::SURVEY_FILE, survey),
        (native::ANSWERS_FILE, answers),
    ] {
        let p = dir.join(file);
        fs::write(&p, text)
            .map_err(|e| DataError::file(name(&p), format!("cannot write {}: {e}", name(&p))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::MetricKind;

    const INFO: &str = "key,question,references,option_mapping,option_ordinal\n\
        Q_W1,\"Safe?\",\"['Yes', \"\"Don't know\"\", 'Refused']\",\"{1.0: 'Yes', 2.0: \"\"Don't know\"\", 99.0: 'Refused'}\",\"[1.0, 2.0]\"\n";

    fn write(p: &Path, text: &str) {
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(p, text).unwrap();
    }

    fn make_wave(dir: &Path, key: &str) {
        write(&dir.join("info.csv"), &INFO.replace("Q_W1", key));
        for a in DEFAULT_ATTRIBUTES {
            let j =
                format!(r#"{{"{key}": {{"v1": {{"Yes": 1.0, "Don't know": 3.0}}, "nan": {{}}}}}}"#);
            write(&dir.join(format!("{a}_data.json")), &j);
        }
    }

    #[test]
    fn formats_parse_and_print() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
        }
        assert!("csv".parse::<Format>().is_err());
    }

    #[test]
    fn detects_and_loads_each_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();

        // One wave.
        let w1 = root.join("hr").join("American_Trends_Panel_W1");
        make_wave(&w1, "Q_W1");
        assert_eq!(detect(&w1).unwrap(), Format::OpinionQa);
        let s = load(&w1).unwrap();
        assert_eq!(s.groups.len(), 8);
        assert_eq!(s.answers[0][0], Some(vec![0.25, 0.75]));

        // human_resp-style directory: waves merged in numeric order, others skipped.
        make_wave(&root.join("hr").join("American_Trends_Panel_W10"), "Q_W10");
        make_wave(&root.join("hr").join("American_Trends_Panel_W2"), "Q_W2");
        write(
            &root
                .join("hr")
                .join("Pew_American_Trends_Panel_disagreement_500")
                .join("info.csv"),
            INFO,
        );
        let hr = root.join("hr");
        assert_eq!(detect(&hr).unwrap(), Format::OpinionQa);
        let s = load(&hr).unwrap();
        let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
        assert_eq!(ids, ["Q_W1", "Q_W2", "Q_W10"]);
        s.validate().unwrap();
        // A caller-chosen attribute list.
        let s = load_opinionqa(&hr, &["SEX"]).unwrap();
        assert_eq!(s.groups.len(), 1);
        let e = load_opinionqa(&w1, &["RELIG"]).unwrap_err();
        assert!(e.file.ends_with("RELIG_data.json"), "{e}");

        // Native round trip.
        let nat = root.join("out").join("native");
        write_native(&nat, &s).unwrap();
        assert_eq!(detect(&nat).unwrap(), Format::Native);
        assert_eq!(load(&nat).unwrap(), s);

        // Weighted, with info.csv beside it.
        let wcsv = w1.join("W1_default_human.csv");
        write(
            &wcsv,
            "qkey,attribute,group,D_H,R_H\nQ_W1,SEX,Male,[0.5 0.5],0.1\n",
        );
        assert_eq!(detect(&wcsv).unwrap(), Format::Weighted);
        let s = load(&wcsv).unwrap();
        assert_eq!(s.groups[0].name, "SEX:Male");
        let lone = root.join("lone.csv");
        write(&lone, "qkey,attribute,group,D_H\nQ_W1,SEX,Male,[0.5 0.5]\n");
        let e = load(&lone).unwrap_err();
        assert!(e.message.contains("info.csv"), "{e}");
        let s = load_weighted(&lone, &w1.join("info.csv")).unwrap();
        assert_eq!(s.metric, MetricKind::Wasserstein);

        // GlobalOpinionQA.
        let g = root.join("global.csv");
        write(&g, "question,selections,options,source\nQ,\"defaultdict(<class 'list'>, {'Peru': [1.0, 0.0]})\",\"['a', 'b']\",WVS\n");
        assert_eq!(detect(&g).unwrap(), Format::Global);
        let s = load_as(&g, Format::Global).unwrap();
        assert_eq!(s.groups[0].name, "Peru");
        assert_eq!(s.metric, MetricKind::JensenShannon);
    }

    #[test]
    fn io_errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        let e = load(&missing).unwrap_err();
        assert!(
            e.file.ends_with("nope") && e.message.contains("cannot read"),
            "{e}"
        );
        let e = load_as(&missing, Format::Native).unwrap_err();
        assert!(
            e.file.ends_with("survey.json") && e.message.contains("cannot read"),
            "{e}"
        );
        let e = load(tmp.path()).unwrap_err();
        assert!(e.message.contains("cannot tell"), "{e}");
        let other = tmp.path().join("x.csv");
        fs::write(&other, "a,b\n1,2\n").unwrap();
        assert!(load(&other).unwrap_err().message.contains("cannot tell"));
        let e = load_weighted(&other, &tmp.path().join("info.csv")).unwrap_err();
        assert!(
            e.file.ends_with("info.csv") && e.message.contains("cannot read"),
            "{e}"
        );
        fs::write(tmp.path().join("info.csv"), INFO).unwrap();
        let e = load_weighted(&other, &tmp.path().join("info.csv")).unwrap_err();
        assert!(
            e.file.ends_with("x.csv") && e.message.contains("missing column"),
            "{e}"
        );
    }

    /// A published wave folder with only some attributes' files (POLPARTY, RACE, SEX):
    /// loads what is there, names what is missing, and `attributes` chooses.
    #[test]
    fn a_wave_with_some_attribute_files_loads_and_names_the_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let hr = tmp.path().join("hr");
        let w1 = hr.join("American_Trends_Panel_W1");
        make_wave(&w1, "Q_W1");
        for a in DEFAULT_ATTRIBUTES {
            if !["POLPARTY", "RACE", "SEX"].contains(&a) {
                fs::remove_file(w1.join(format!("{a}_data.json"))).unwrap();
            }
        }
        let (s, report) = load_with(&w1, None, &LoadOptions::default()).unwrap();
        let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["POLPARTY:v1", "RACE:v1", "SEX:v1"]);
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        let w = &report.warnings[0];
        assert!(
            w.contains("AGE, CREGION, EDUCATION, INCOME, POLIDEOLOGY")
                && w.contains("loaded POLPARTY, RACE, SEX"),
            "{w}"
        );
        // Choosing attributes: only those, no warning.
        let opts = LoadOptions {
            attributes: Some(vec!["SEX".into(), "RACE".into()]),
        };
        let (s, report) = load_with(&w1, Some(Format::OpinionQa), &opts).unwrap();
        assert_eq!(s.groups.len(), 2);
        assert!(report.is_empty(), "{report:?}");
        // A second wave with none of the chosen attributes is skipped with a warning.
        let w2 = hr.join("American_Trends_Panel_W2");
        make_wave(&w2, "Q_W2");
        fs::remove_file(w2.join("SEX_data.json")).unwrap();
        fs::remove_file(w2.join("RACE_data.json")).unwrap();
        let (s, report) = load_with(&hr, None, &opts).unwrap();
        assert_eq!(s.questions.len(), 1);
        assert!(report.warnings[0].contains("wave skipped"), "{report:?}");
        // None of them anywhere: an error naming a file it looked for.
        let opts = LoadOptions {
            attributes: Some(vec!["RELIG".into()]),
        };
        let e = load_with(&hr, None, &opts).unwrap_err();
        assert!(e.file.ends_with("RELIG_data.json"), "{e}");
    }
}
