//! Tests of [`super`], in their own file to keep the module under the ~600-line limit.

use super::*;

const INFO: &str = r#",Unnamed: 0,key,option_mapping,question,references,option_ordinal
0,0,SAFE_W1,"{1.0: 'Very safe', 2.0: 'Not safe', 99.0: 'Refused'}","How safe is it?","['Very safe', 'Not safe', 'Refused']","[1.0, 2.0]"
1,1,GUN_W1,"{1.0: 'Yes, I own a gun', 2.0: ""No, I don't own any guns"", 99.0: 'Refused'}","Do you own a gun?","['Yes, I own a gun', ""No, I don't own any guns"", 'Refused']","[1.0, 2.0]"
2,2,MOVE_W1,"{1.0: 'Would move', 2.0: 'Would not', 3.0: 'Not sure', 99.0: 'Refused'}","Move?","['Would move', 'Would not', 'Not sure', 'Refused']","[1.0, 2.0]"
3,3,UNUSED_W1,"{1.0: 'A'}","Unused","['A', broken","[1.0]"
"#;

const SEX: &str = r#"{"SAFE_W1": {"MC_options": ["Very safe", "Not safe", "Refused"], "question_text": "How safe is it?",
 "Female": {"Very safe": 3.0, "Not safe": 1.0, "Refused": 5.0},
 "Male": {"Very safe": 1.0},
 "Refused": {"Very safe": 1.0}},
"GUN_W1": {"MC_options": ["Yes", "I own a gun", "\"No", "I don't own any guns\"", "Refused"],
 "Female": {"No, I don't own any guns": 3.0, "yes, i own a gun": 1.0},
 "Male": {},
 "nan": {}},
"MOVE_W1": {"Female": {"Would move": 1.0, "Not sure": 7.0}, "Male": {"Not sure": 2.0, "Refused": 1.0}}
}"#;

const AGE: &str =
    r#"{"SAFE_W1": {"18-29": {"Very safe": 1.0, "Not safe": 1.0}, "Other": {"Very safe": 1.0}}}"#;

fn wave(attrs: &[AttributeFile]) -> DataResult<Survey> {
    parse_wave("W1", INFO, "info.csv", attrs)
}

fn ok_wave() -> Survey {
    wave(&[
        AttributeFile {
            attribute: "SEX",
            file: "SEX_data.json",
            json: SEX,
        },
        AttributeFile {
            attribute: "AGE",
            file: "AGE_data.json",
            json: AGE,
        },
    ])
    .unwrap()
}

#[test]
fn parses_a_wave() {
    let s = ok_wave();
    s.validate().unwrap();
    assert_eq!(s.metric, MetricKind::Wasserstein);
    let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids, ["SAFE_W1", "GUN_W1", "MOVE_W1"]);
    let names: Vec<&str> = s.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["SEX:Female", "SEX:Male", "AGE:18-29"]);
    // Refusal dropped and normalized over points.
    assert_eq!(s.answers[0][0], Some(vec![0.75, 0.25]));
    // Missing option counts 0.
    assert_eq!(s.answers[1][0], Some(vec![1.0, 0.0]));
    // Apostrophes, commas; case-insensitive match of "yes, i own a gun".
    let gun = &s.questions[1];
    assert_eq!(gun.options[1].text, "No, I don't own any guns");
    assert_eq!(s.answers[0][1], Some(vec![0.25, 0.75]));
    // Empty counts: no answer.
    assert_eq!(s.answers[1][1], None);
    // "Not sure" beyond the ordinal list is a refusal; Male answered only refusals.
    let mv = &s.questions[2];
    assert_eq!(mv.n_answerable(), 2);
    assert!(mv.options[2].refusal && mv.options[3].refusal);
    assert_eq!(mv.options[1].ordinal, Some(2.0));
    assert_eq!(mv.options[2].ordinal, None);
    assert_eq!(s.answers[0][2], Some(vec![1.0, 0.0]));
    assert_eq!(s.answers[1][2], None);
    assert_eq!(s.answers[2][0], Some(vec![0.5, 0.5]));
    assert_eq!(s.answers[2][1], None);
    assert_eq!(s.questions[0].ordinals(), Some(vec![1.0, 2.0]));
}

#[test]
fn merges_waves() {
    let a = ok_wave();
    let info2 = "key,question,references,option_mapping,option_ordinal\nX_W2,Q?,\"['a', 'b']\",\"{1: 'a', 2: 'b'}\",\"[1, 2]\"\n";
    let j = r#"{"X_W2": {"Female": {"a": 1.0}, "Other": {"a": 2.0}}}"#;
    let b = parse_wave(
        "W2",
        info2,
        "w2/info.csv",
        &[AttributeFile {
            attribute: "SEX",
            file: "w2/SEX_data.json",
            json: j,
        }],
    )
    .unwrap();
    let m = merge_waves("all", vec![a.clone(), b.clone()]).unwrap();
    m.validate().unwrap();
    assert_eq!(m.questions.len(), 4);
    assert_eq!(m.groups.len(), 3);
    assert_eq!(m.answers[0][3], Some(vec![1.0, 0.0]));
    assert_eq!(m.answers[1][3], None);
    assert_eq!(m.answers[2][3], None);
    let e = merge_waves("all", vec![a.clone(), a]).unwrap_err();
    assert_eq!(e.file, "W1");
    assert_eq!(e.field.as_deref(), Some("key"));
    assert!(e.message.contains("SAFE_W1"));
}

fn one(json: &str) -> DataError {
    wave(&[AttributeFile {
        attribute: "SEX",
        file: "SEX_data.json",
        json,
    }])
    .unwrap_err()
}

#[test]
fn unknown_option_is_located() {
    let e = one("{\"SAFE_W1\": {\n \"Female\": {\n  \"Very safe\": 1.0,\n  \"Kinda safe\": 2.0}}}");
    assert_eq!(e.file, "SEX_data.json");
    assert_eq!(e.line, Some(4));
    assert_eq!(
        e.field.as_deref(),
        Some(r#"SAFE_W1["Female"]["Kinda safe"]"#)
    );
    assert!(e.message.contains("unknown option `Kinda safe`"), "{e}");
}

#[test]
fn bad_counts_are_located() {
    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": -1.0}}}");
    assert_eq!((e.file.as_str(), e.line), ("SEX_data.json", Some(1)));
    assert_eq!(
        e.field.as_deref(),
        Some(r#"SAFE_W1["Female"]["Very safe"]"#)
    );
    assert!(e.message.contains("-1"), "{e}");

    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": null}}}");
    assert!(e.message.contains("NaN"), "{e}");
    assert_eq!(
        e.field.as_deref(),
        Some(r#"SAFE_W1["Female"]["Very safe"]"#)
    );

    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": \"3\"}}}");
    assert!(e.message.contains("expected a non-negative number"), "{e}");

    // Python's json.dump writes NaN, which is not JSON: a syntax error with a clear message.
    let e = one("{\"SAFE_W1\":\n {\"Female\": {\"Very safe\": NaN}}}");
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("NaN"), "{e}");

    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 0.0, \"Refused\": 0}}}");
    assert_eq!(e.field.as_deref(), Some(r#"SAFE_W1["Female"]"#));
    assert!(e.message.contains("all counts are zero"), "{e}");

    let e = one("{\"SAFE_W1\": {\"Female\": [1, 2]}}");
    assert_eq!(e.field.as_deref(), Some(r#"SAFE_W1["Female"]"#));
}

#[test]
fn bad_json_and_keys() {
    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 1.0}\n,}");
    assert_eq!(e.line, Some(2));
    assert!(e.message.starts_with("invalid JSON"), "{e}");
    let e = one("{\"NOPE_W1\": {}}");
    assert_eq!(e.field.as_deref(), Some("NOPE_W1"));
    assert_eq!(e.line, Some(1));
    assert!(e.message.contains("not in info.csv"));
    let e = one("{\"SAFE_W1\": 3}");
    assert!(e.message.contains("JSON object"), "{e}");
    let e = one("{\"SAFE_W1\": {}, \"SAFE_W1\": {}}");
    assert!(e.message.contains("twice"), "{e}");
    // The unused row's broken literal is only an error once the question is used.
    let e = one("{\"UNUSED_W1\": {\"Female\": {\"A\": 1}}}");
    assert_eq!((e.file.as_str(), e.line), ("info.csv", Some(5)));
    assert_eq!(e.field.as_deref(), Some("references"));
    assert!(e.message.contains("character"), "{e}");
}

fn info_err(info: &str) -> DataError {
    let j = r#"{"Q": {"Female": {"a": 1.0}}}"#;
    parse_wave(
        "W",
        info,
        "info.csv",
        &[AttributeFile {
            attribute: "SEX",
            file: "SEX_data.json",
            json: j,
        }],
    )
    .unwrap_err()
}

fn csv_field(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

const HDR: &str = "key,question,references,option_mapping,option_ordinal\n";

#[test]
fn info_errors_are_located() {
    // Malformed CSV row (wrong number of fields).
    let e = info_err(&format!("{HDR}Q,text,\"['a']\",\"{{}}\"\n"));
    assert_eq!((e.file.as_str(), e.line), ("info.csv", Some(2)));
    assert!(e.message.contains("malformed CSV row"), "{e}");
    // Missing column.
    let e = info_err("key,question,references,option_mapping\nQ,t,x,y\n");
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(1), Some("option_ordinal"))
    );
    // Ordinal list too long.
    let e = info_err(&format!(
        "{HDR}Q,t,\"['a', 'Refused']\",\"{{1.0: 'a', 99.0: 'Refused'}}\",\"[1.0, 2.0]\"\n"
    ));
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(2), Some("option_ordinal"))
    );
    assert!(e.message.contains("length mismatch"), "{e}");
    // Empty ordinal list.
    let e = info_err(&format!("{HDR}Q,t,\"['a']\",\"{{}}\",\"[]\"\n"));
    assert!(e.message.contains("length mismatch"), "{e}");
    // Refusal code naming an unknown option.
    let e = info_err(&format!(
        "{HDR}Q,t,\"['a', 'b']\",\"{{99.0: 'Refused'}}\",\"[1.0]\"\n"
    ));
    assert_eq!(e.field.as_deref(), Some("option_mapping"));
    // Bad ordinal values.
    let e = info_err(&format!(
        "{HDR}Q,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n"
    ));
    assert_eq!(e.field.as_deref(), Some("option_ordinal"));
    let e = info_err(&format!(
        "{HDR}Q,t,\"['a', 'b']\",\"{{}}\",\"[1.0, nan]\"\n"
    ));
    assert!(e.message.contains("finite"), "{e}");
    // Duplicate option texts.
    let e = info_err(&format!("{HDR}Q,t,\"['a', 'a']\",\"{{}}\",\"[1]\"\n"));
    assert!(e.message.contains("twice"), "{e}");
}

#[test]
fn multiline_csv_rows_keep_line_numbers() {
    let info = format!("{HDR}A,\"two\nlines\",\"['a']\",\"{{}}\",\"[1]\"\nQ,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n");
    let e = info_err(&info);
    assert_eq!(e.line, Some(4));
}

#[test]
fn no_refusal_option_and_escaped_quotes() {
    let refs = r#"['Associate\'s degree', "It's \"fine\""]"#;
    let info = format!("{HDR}Q,t,{},\"{{1: 'x'}}\",\"[1, 2]\"\n", csv_field(refs));
    let j = r#"{"Q": {"Female": {"Associate's degree": 1.0, "It's \"fine\"": 3.0}}}"#;
    let s = parse_wave(
        "W",
        &info,
        "info.csv",
        &[AttributeFile {
            attribute: "SEX",
            file: "f",
            json: j,
        }],
    )
    .unwrap();
    assert_eq!(s.questions[0].options[0].text, "Associate's degree");
    assert_eq!(s.questions[0].options[1].text, "It's \"fine\"");
    assert!(s.questions[0].options.iter().all(|o| !o.refusal));
    assert_eq!(s.answers[0][0], Some(vec![0.25, 0.75]));
}

/// A wave whose info.csv gives one key to two sub-questions (IDIMPORT_W43-style): the
/// one count entry cannot be matched to either, so that question is skipped with one
/// warning naming it, and the rest of the wave loads.
#[test]
fn a_key_on_several_info_rows_is_skipped_with_one_warning() {
    let info = format!(
        "{HDR}IMP_W1,How important is A?,\"['Very', 'Not']\",\"{{}}\",\"[1, 2]\"\r\n\
         IMP_W1,How important is B?,\"['Very', 'Not']\",\"{{}}\",\"[1, 2]\"\r\n\
         OK_W1,Fine?,\"['Yes', 'No']\",\"{{}}\",\"[1, 2]\"\r\n"
    );
    let j =
        r#"{"IMP_W1": {"Female": {"Very": 1.0}}, "OK_W1": {"Female": {"Yes": 1.0, "No": 3.0}}}"#;
    let files = [
        AttributeFile {
            attribute: "SEX",
            file: "SEX_data.json",
            json: j,
        },
        AttributeFile {
            attribute: "AGE",
            file: "AGE_data.json",
            json: j,
        },
    ];
    let (s, report) = parse_wave_report("W", &info, "info.csv", &files).unwrap();
    let ids: Vec<&str> = s.questions.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids, ["OK_W1"]);
    assert_eq!(s.answers[0][0], Some(vec![0.25, 0.75]));
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let w = &report.warnings[0];
    // CRLF line endings: the rows are on lines 2 and 3.
    assert!(
        w.contains("IMP_W1") && w.contains("lines 2, 3") && w.contains("skipped"),
        "{w}"
    );
}

#[test]
fn crlf_info_errors_have_the_right_line() {
    let info = format!(
        "{HDR}A,t,\"['a']\",\"{{}}\",\"[1]\"\nQ,t,\"['a', 'b']\",\"{{}}\",\"[1.0, 'x']\"\n"
    );
    assert_eq!(info_err(&info).line, Some(3));
    assert_eq!(info_err(&info.replace('\n', "\r\n")).line, Some(3));
    // A structure error names the first missing column.
    let e = info_err(&format!("{HDR}Q,text,\"['a']\",\"{{}}\"\r\n"));
    assert_eq!(
        (e.line, e.field.as_deref()),
        (Some(2), Some("option_ordinal"))
    );
}

#[test]
fn json_syntax_errors_name_a_path() {
    let e = one("{\"SAFE_W1\": {\"Female\": {\"Very safe\": 1.0 2.0}}}");
    assert_eq!(
        e.field.as_deref(),
        Some("SAFE_W1[\"Female\"][\"Very safe\"]")
    );
}
