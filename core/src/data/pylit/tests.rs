//! Tests of [`super`], in their own file to keep the module under the ~600-line limit.

use super::*;

fn s(x: &str) -> PyValue {
    PyValue::Str(x.to_string())
}

#[test]
fn scalars() {
    assert_eq!(parse("None").unwrap(), PyValue::None);
    assert_eq!(parse(" True ").unwrap(), PyValue::Bool(true));
    assert_eq!(parse("False").unwrap(), PyValue::Bool(false));
    assert_eq!(parse("42").unwrap(), PyValue::Int(42));
    assert_eq!(parse("-7").unwrap(), PyValue::Int(-7));
    assert_eq!(parse("99.0").unwrap(), PyValue::Float(99.0));
    assert_eq!(parse("-1.5e-3").unwrap(), PyValue::Float(-1.5e-3));
    assert_eq!(parse("1E3").unwrap(), PyValue::Float(1000.0));
    assert_eq!(parse(".5").unwrap(), PyValue::Float(0.5));
    assert_eq!(parse("5.").unwrap(), PyValue::Float(5.0));
    assert_eq!(parse("inf").unwrap(), PyValue::Float(f64::INFINITY));
    assert_eq!(parse("-inf").unwrap(), PyValue::Float(f64::NEG_INFINITY));
    assert!(parse("nan").unwrap().as_f64().unwrap().is_nan());
    // Too big for i64: read as a float.
    assert_eq!(
        parse("123456789012345678901234").unwrap(),
        PyValue::Float(1.2345678901234568e23)
    );
}

#[test]
fn strings_and_escapes() {
    assert_eq!(
        parse(r"'Associate\'s degree'").unwrap(),
        s("Associate's degree")
    );
    assert_eq!(
        parse(r#""Associate's degree""#).unwrap(),
        s("Associate's degree")
    );
    assert_eq!(parse(r#"'He said "no"'"#).unwrap(), s("He said \"no\""));
    assert_eq!(
        parse(r#""a \"quoted\" word""#).unwrap(),
        s("a \"quoted\" word")
    );
    assert_eq!(
        parse(r"'tab\there\nnl \\ back'").unwrap(),
        s("tab\there\nnl \\ back")
    );
    assert_eq!(
        parse(r"'caf\xe9 \u00e9 \U0001F600 \101'").unwrap(),
        s("café é 😀 A")
    );
    assert_eq!(parse(r"'keep \d'").unwrap(), s("keep \\d"));
    assert_eq!(parse("'Côte d’Ivoire'").unwrap(), s("Côte d’Ivoire"));
    assert_eq!(parse(r"u'x'").unwrap(), s("x"));
    assert_eq!(parse(r"r'a\'b\n'").unwrap(), s("a\\'b\\n"));
    assert_eq!(parse("'a' \"b\"").unwrap(), s("ab"));
    assert_eq!(parse("''").unwrap(), s(""));
}

#[test]
fn containers() {
    assert_eq!(
        parse("['Very safe', \"Don't know\", 'Refused',]").unwrap(),
        PyValue::List(vec![s("Very safe"), s("Don't know"), s("Refused")])
    );
    assert_eq!(parse("[]").unwrap(), PyValue::List(vec![]));
    assert_eq!(parse("()").unwrap(), PyValue::Tuple(vec![]));
    assert_eq!(
        parse("(1,)").unwrap(),
        PyValue::Tuple(vec![PyValue::Int(1)])
    );
    assert_eq!(parse("(1)").unwrap(), PyValue::Int(1));
    assert_eq!(
        parse("(1, 'a')").unwrap(),
        PyValue::Tuple(vec![PyValue::Int(1), s("a")])
    );
    let d = parse("{1.0: 'Very safe', 99.0: 'Refused'}").unwrap();
    assert_eq!(
        d,
        PyValue::Dict(vec![
            (PyValue::Float(1.0), s("Very safe")),
            (PyValue::Float(99.0), s("Refused"))
        ])
    );
    let d = parse("{'a': [1, 2.5, nan], 'b': {'c': None}}").unwrap();
    let entries = d.as_dict().unwrap();
    assert_eq!(entries[0].0, s("a"));
    let nums = entries[0].1.to_f64_list().unwrap();
    assert_eq!(&nums[..2], &[1.0, 2.5]);
    assert!(nums[2].is_nan());
    assert_eq!(parse("[[1, 2], [3]]").unwrap().as_seq().unwrap().len(), 2);
}

#[test]
fn defaultdict_and_numpy_wrappers() {
    let d = parse(
        "defaultdict(<class 'list'>, {'Nigeria': [0.1, 0.9], \"Cote d'Ivoire\": [1.0, 0.0]})",
    )
    .unwrap();
    let e = d.as_dict().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[1].0, s("Cote d'Ivoire"));
    assert_eq!(e[0].1.to_f64_list().unwrap(), vec![0.1, 0.9]);
    assert_eq!(
        parse("defaultdict(<class 'list'>, {})").unwrap(),
        PyValue::Dict(vec![])
    );
    assert_eq!(
        parse("[np.float64(0.25), numpy.int64(3)]").unwrap(),
        PyValue::List(vec![PyValue::Float(0.25), PyValue::Int(3)])
    );
}

#[test]
fn conversions() {
    assert_eq!(
        parse("['a', 'b']").unwrap().to_str_list().unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );
    assert_eq!(
        parse("['a', 1]").unwrap().to_str_list().unwrap_err(),
        "item 1 is a int, expected a string"
    );
    assert!(parse("{1: 2}").unwrap().to_f64_list().is_err());
}

#[test]
fn errors_give_offset_and_expectation() {
    let e = parse("['a', 'b'").unwrap_err();
    assert_eq!(e.offset, 9);
    assert!(e.expected.contains("`,` or `]`"), "{e}");
    let e = parse("['a' 'b' 3]").unwrap_err();
    assert_eq!(e.offset, 9, "{e}");
    let e = parse("'unterminated").unwrap_err();
    assert_eq!(e.offset, 0);
    assert!(e.expected.contains("closing"));
    let e = parse("[1, 2] x").unwrap_err();
    assert_eq!(e.offset, 7);
    assert_eq!(e.expected, "end of input");
    let e = parse("{1, 2}").unwrap_err();
    assert_eq!(e.offset, 2);
    assert!(e.expected.contains("`:`"));
    let e = parse("[1, foo]").unwrap_err();
    assert_eq!(e.offset, 4);
    let e = parse("").unwrap_err();
    assert_eq!(e.offset, 0);
    let e = parse("1.2.3").unwrap_err();
    assert_eq!(e.offset, 3);
    let e = parse("1e").unwrap_err();
    assert_eq!(e.offset, 2);
    let e = parse(r"'\x4'").unwrap_err();
    assert!(e.expected.contains("hex"));
    // Offsets count characters, not bytes.
    let e = parse("['é', ").unwrap_err();
    assert_eq!(e.offset, 6);
    let deep = "[".repeat(10_000);
    assert!(parse(&deep).is_err());
    assert!(e.to_string().contains("character 6"));
}
