//! A minimal renderer for exactly the Go-template subset `charts/buildshuttle` uses, so the
//! chart and `manifests/` come from one source without a helm binary. It is strict where Helm
//! is lenient (a missing value is an error, not an empty string), so a typo'd value path in a
//! template fails the tests instead of rendering nothing.
//!
//! Supported: text; `{{ }}` with `{{-`/`-}}` trimming; `{{/* comments */}}`; `define`,
//! `if`/`else if`/`else`/`end`; pipelines `a | f x`; operands `.Values.a.b`, `.Release.*`,
//! `.Chart.*`, `.`, string/number/bool literals, `( … )`; functions `include`, `quote`,
//! `toYaml`, `toJson`, `indent`, `nindent`, `printf` (`%s`, `%v`, `%d`), `eq`, `ne`, `not`,
//! `and`, `or`, `default`, `required`, `fail`, `int64`. Anything else is an error.
//!
//! `required` and `fail` behave as in Helm: `required MSG X` fails only when X is nil
//! (unset, including a missing key) or the empty string (so `0` and `false` pass), `fail MSG`
//! always fails, and either stops the whole render with `execution error at
//! (templates/FILE): MSG` (Helm adds line and column, which this renderer does not track).
//!
//! Numbers behave as in Helm, which reads values.yaml into float64: `helm_values` turns every
//! number into a float, printed like Go's `%v` (1200000 prints as `1.2e+06`, a classic Helm
//! trap), so a template must write `int64` where it prints a large number.

use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Output(Pipeline),
    If(Vec<(Pipeline, Vec<Node>)>, Vec<Node>),
}

type Pipeline = Vec<Command>;

#[derive(Debug, Clone, PartialEq)]
enum Command {
    Call(String, Vec<Operand>),
    Value(Operand),
}

#[derive(Debug, Clone, PartialEq)]
enum Operand {
    Path(Vec<String>),
    Lit(Value),
    Sub(Pipeline),
}

/// Parsed templates: the named ones (`define`) and the files.
#[derive(Default)]
pub struct Templates {
    defines: BTreeMap<String, Vec<Node>>,
    files: BTreeMap<String, Vec<Node>>,
}

enum Piece {
    Text(String),
    Action(String),
}

/// Splits into text and actions, applying `{{-` / `-}}` trimming and dropping comments.
fn lex(src: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    loop {
        let (text, after) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut text = text.to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let Some(after) = after else {
            out.push(Piece::Text(text));
            return Ok(out);
        };
        let trim_left = after.starts_with("- ") || after.starts_with("-\n");
        if trim_left {
            text = text.trim_end().to_string();
        }
        out.push(Piece::Text(text));
        let body_start = if trim_left { &after[1..] } else { after };
        let end = body_start
            .find("}}")
            .ok_or_else(|| format!("unclosed action near {:?}", &after[..after.len().min(40)]))?;
        let mut body = &body_start[..end];
        trim_next = body.ends_with(" -") || body.ends_with("\n-");
        if trim_next {
            body = &body[..body.len() - 1];
        }
        let body = body.trim();
        if !(body.starts_with("/*") && body.ends_with("*/")) {
            out.push(Piece::Action(body.to_string()));
        }
        rest = &body_start[end + 2..];
    }
}

fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut toks = Vec::new();
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' {
            let mut t = String::from('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    t.push(chars[i]);
                    i += 1;
                }
                t.push(chars[i]);
                i += 1;
            }
            if i == chars.len() {
                return Err(format!("unterminated string in {s:?}"));
            }
            t.push('"');
            toks.push(t);
            i += 1;
        } else if "()|".contains(c) {
            toks.push(c.to_string());
            i += 1;
        } else {
            let start = i;
            while i < chars.len() && !chars[i].is_whitespace() && !"()|\"".contains(chars[i]) {
                i += 1;
            }
            toks.push(chars[start..i].iter().collect());
        }
    }
    Ok(toks)
}

fn parse_pipeline(toks: &[String], pos: &mut usize) -> Result<Pipeline, String> {
    let mut cmds = Vec::new();
    loop {
        let mut words = Vec::new();
        while *pos < toks.len() && toks[*pos] != "|" && toks[*pos] != ")" {
            words.push(parse_operand_or_name(toks, pos)?);
        }
        let mut words = words.into_iter();
        let cmd = match words.next() {
            Some(Err(name)) => Command::Call(
                name,
                words
                    .map(|w| w.map_err(|n| format!("{n:?} is not an argument")))
                    .collect::<Result<_, _>>()?,
            ),
            Some(Ok(op)) if words.len() == 0 => Command::Value(op),
            Some(Ok(_)) => return Err("a value cannot take arguments".into()),
            None => return Err("empty command".into()),
        };
        cmds.push(cmd);
        if *pos < toks.len() && toks[*pos] == "|" {
            *pos += 1;
        } else {
            return Ok(cmds);
        }
    }
}

/// `Ok(operand)`, or `Err(name)` for a function name.
fn parse_operand_or_name(
    toks: &[String],
    pos: &mut usize,
) -> Result<Result<Operand, String>, String> {
    let t = toks[*pos].clone();
    *pos += 1;
    Ok(Ok(if t == "(" {
        let p = parse_pipeline(toks, pos)?;
        if toks.get(*pos).map(String::as_str) != Some(")") {
            return Err("missing )".into());
        }
        *pos += 1;
        Operand::Sub(p)
    } else if t.starts_with('"') {
        Operand::Lit(Value::String(
            serde_json::from_str(&t).map_err(|e| format!("bad string {t}: {e}"))?,
        ))
    } else if t == "." {
        Operand::Path(Vec::new())
    } else if let Some(path) = t.strip_prefix('.') {
        Operand::Path(path.split('.').map(str::to_string).collect())
    } else if t == "true" || t == "false" {
        Operand::Lit(Value::Bool(t == "true"))
    } else if let Ok(n) = t.parse::<i64>() {
        Operand::Lit(Value::from(n))
    } else if t.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(Err(t));
    } else {
        return Err(format!("unsupported token {t:?}"));
    }))
}

fn pipeline_of(src: &str) -> Result<Pipeline, String> {
    let toks = tokenize(src)?;
    let mut pos = 0;
    let p = parse_pipeline(&toks, &mut pos)?;
    if pos != toks.len() {
        return Err(format!("trailing tokens in {src:?}"));
    }
    Ok(p)
}

enum Stop {
    End,
    Else,
    ElseIf(Pipeline),
    Eof,
}

fn parse_nodes(
    pieces: &mut std::iter::Peekable<std::vec::IntoIter<Piece>>,
    defines: &mut BTreeMap<String, Vec<Node>>,
) -> Result<(Vec<Node>, Stop), String> {
    let mut nodes = Vec::new();
    while let Some(p) = pieces.next() {
        let action = match p {
            Piece::Text(t) => {
                if !t.is_empty() {
                    nodes.push(Node::Text(t));
                }
                continue;
            }
            Piece::Action(a) => a,
        };
        let (word, rest) = action.split_once(' ').unwrap_or((&action, ""));
        match word {
            "end" => return Ok((nodes, Stop::End)),
            "else" if rest.trim().is_empty() => return Ok((nodes, Stop::Else)),
            "else" => {
                let cond = rest
                    .trim()
                    .strip_prefix("if ")
                    .ok_or_else(|| format!("unsupported {action:?}"))?;
                return Ok((nodes, Stop::ElseIf(pipeline_of(cond)?)));
            }
            "define" => {
                let name: String = serde_json::from_str(rest.trim())
                    .map_err(|e| format!("define needs a quoted name: {e}"))?;
                let (body, stop) = parse_nodes(pieces, defines)?;
                if !matches!(stop, Stop::End) {
                    return Err(format!("define {name:?} is not closed by end"));
                }
                defines.insert(name, body);
            }
            "if" => {
                let mut branches = Vec::new();
                let mut cond = pipeline_of(rest)?;
                let otherwise = loop {
                    let (body, stop) = parse_nodes(pieces, defines)?;
                    branches.push((cond, body));
                    match stop {
                        Stop::End => break Vec::new(),
                        Stop::ElseIf(c) => cond = c,
                        Stop::Else => {
                            let (body, stop) = parse_nodes(pieces, defines)?;
                            if !matches!(stop, Stop::End) {
                                return Err("else is not closed by end".into());
                            }
                            break body;
                        }
                        Stop::Eof => return Err("if is not closed by end".into()),
                    }
                };
                nodes.push(Node::If(branches, otherwise));
            }
            "range" | "with" | "template" | "block" => {
                return Err(format!("{word} is outside the supported subset"))
            }
            _ => nodes.push(Node::Output(pipeline_of(&action)?)),
        }
    }
    Ok((nodes, Stop::Eof))
}

impl Templates {
    /// Adds one template file (named as Helm names it, e.g. `templates/service.yaml`).
    pub fn add(&mut self, name: &str, src: &str) -> Result<(), String> {
        let mut pieces = lex(src)?.into_iter().peekable();
        let (nodes, stop) =
            parse_nodes(&mut pieces, &mut self.defines).map_err(|e| format!("{name}: {e}"))?;
        if !matches!(stop, Stop::Eof) {
            return Err(format!("{name}: unexpected end/else"));
        }
        self.files.insert(name.to_string(), nodes);
        Ok(())
    }

    pub fn render(&self, name: &str, root: &Value) -> Result<String, String> {
        let nodes = self
            .files
            .get(name)
            .ok_or_else(|| format!("no template {name}"))?;
        let mut out = String::new();
        self.exec(nodes, root, &mut out)
            .map_err(|e| match e.strip_prefix(EXECUTION_ERROR) {
                Some(msg) => format!("execution error at (templates/{name}): {msg}"),
                None => format!("{name}: {e}"),
            })?;
        Ok(out)
    }

    fn exec(&self, nodes: &[Node], dot: &Value, out: &mut String) -> Result<(), String> {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Output(p) => out.push_str(&to_text(&self.eval(p, dot)?)?),
                Node::If(branches, otherwise) => {
                    let mut taken = false;
                    for (cond, body) in branches {
                        if truthy(&self.eval(cond, dot)?) {
                            self.exec(body, dot, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.exec(otherwise, dot, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn eval(&self, p: &Pipeline, dot: &Value) -> Result<Value, String> {
        let mut piped: Option<Value> = None;
        for cmd in p {
            let v = match cmd {
                Command::Value(op) => {
                    if piped.is_some() {
                        return Err("a value cannot be piped into a value".into());
                    }
                    self.operand(op, dot)?
                }
                Command::Call(name, args) => {
                    let mut vals = args
                        .iter()
                        .map(|a| match (name.as_str(), a) {
                            // Helm reads a missing key as nil, which `required` then refuses
                            // with its own message.
                            ("required", Operand::Path(_)) => {
                                Ok(self.operand(a, dot).unwrap_or(Value::Null))
                            }
                            _ => self.operand(a, dot),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    vals.extend(piped.take());
                    self.call(name, vals)?
                }
            };
            piped = Some(v);
        }
        piped.ok_or_else(|| "empty pipeline".into())
    }

    fn operand(&self, op: &Operand, dot: &Value) -> Result<Value, String> {
        match op {
            Operand::Lit(v) => Ok(v.clone()),
            Operand::Sub(p) => self.eval(p, dot),
            Operand::Path(path) => {
                let mut v = dot;
                for (i, key) in path.iter().enumerate() {
                    v = v.get(key).ok_or_else(|| {
                        format!(
                            ".{} is not set (add it to values.yaml)",
                            path[..=i].join(".")
                        )
                    })?;
                }
                Ok(v.clone())
            }
        }
    }

    fn call(&self, name: &str, a: Vec<Value>) -> Result<Value, String> {
        let arity = |n: usize| {
            if a.len() == n {
                Ok(())
            } else {
                Err(format!("{name} takes {n} arguments, got {}", a.len()))
            }
        };
        Ok(match name {
            "include" => {
                arity(2)?;
                let tname = a[0].as_str().ok_or("include needs a name")?;
                let body = self
                    .defines
                    .get(tname)
                    .ok_or_else(|| format!("no template {tname:?} defined"))?;
                let mut out = String::new();
                self.exec(body, &a[1], &mut out)?;
                Value::String(out)
            }
            "int64" => {
                arity(1)?;
                let f = a[0].as_f64().ok_or("int64 needs a number")?;
                Value::from(f as i64)
            }
            "quote" => {
                arity(1)?;
                Value::String(serde_json::to_string(&to_text(&a[0])?).unwrap())
            }
            "sha256sum" => {
                arity(1)?;
                use sha2::Digest;
                let digest = sha2::Sha256::digest(to_text(&a[0])?.as_bytes());
                Value::String(digest.iter().map(|b| format!("{b:02x}")).collect())
            }
            "toJson" => {
                arity(1)?;
                Value::String(serde_json::to_string(&integral(&a[0])).unwrap())
            }
            "toYaml" => {
                arity(1)?;
                let y = serde_yaml::to_string(&integral(&a[0])).map_err(|e| e.to_string())?;
                Value::String(y.trim_end_matches('\n').to_string())
            }
            "indent" | "nindent" => {
                arity(2)?;
                let n = a[0].as_u64().ok_or("indent needs a number")? as usize;
                let pad = " ".repeat(n);
                let s = to_text(&a[1])?;
                let body = s
                    .split('\n')
                    .map(|l| format!("{pad}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Value::String(if name == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "printf" => {
                let fmt = a
                    .first()
                    .and_then(Value::as_str)
                    .ok_or("printf needs a format")?;
                let mut args = a[1..].iter();
                let mut out = String::new();
                let mut chars = fmt.chars();
                while let Some(c) = chars.next() {
                    if c != '%' {
                        out.push(c);
                        continue;
                    }
                    match chars.next() {
                        Some('%') => out.push('%'),
                        Some('s' | 'v' | 'd') => {
                            out.push_str(&to_text(args.next().ok_or("printf: too few arguments")?)?)
                        }
                        other => return Err(format!("printf: unsupported verb {other:?}")),
                    }
                }
                if args.next().is_some() {
                    return Err("printf: too many arguments".into());
                }
                Value::String(out)
            }
            "eq" | "ne" => {
                arity(2)?;
                Value::Bool((a[0] == a[1]) == (name == "eq"))
            }
            "not" => {
                arity(1)?;
                Value::Bool(!truthy(&a[0]))
            }
            "and" | "or" => {
                if a.len() < 2 {
                    return Err(format!("{name} takes at least 2 arguments"));
                }
                let pick = a
                    .iter()
                    .find(|v| truthy(v) == (name == "or"))
                    .unwrap_or(a.last().unwrap());
                pick.clone()
            }
            "default" => {
                arity(2)?;
                if truthy(&a[1]) {
                    a[1].clone()
                } else {
                    a[0].clone()
                }
            }
            "required" => {
                arity(2)?;
                // Sprig's `required`: only nil and "" are missing; 0 and false are values.
                if a[1].is_null() || a[1].as_str() == Some("") {
                    return Err(format!("{EXECUTION_ERROR}{}", to_text(&a[0])?));
                }
                a[1].clone()
            }
            "fail" => {
                arity(1)?;
                return Err(format!("{EXECUTION_ERROR}{}", to_text(&a[0])?));
            }
            other => {
                return Err(format!(
                    "function {other:?} is outside the supported subset"
                ))
            }
        })
    }
}

/// How `required` and `fail` mark their error until `render` names the file, as Helm does.
const EXECUTION_ERROR: &str = "execution error: ";

/// Values as Helm holds them: every number a float64.
pub fn helm_values(v: &Value) -> Value {
    match v {
        Value::Number(n) => {
            serde_json::Number::from_f64(n.as_f64().unwrap()).map_or(Value::Null, Value::Number)
        }
        Value::Array(a) => Value::Array(a.iter().map(helm_values).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), helm_values(v))).collect())
        }
        other => other.clone(),
    }
}

/// What toJson/toYaml write for a number: Go's encoding/json prints a whole float64 below
/// 1e21 without a fraction, which YAML then reads as an integer.
fn integral(v: &Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => Value::from(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(integral).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), integral(v))).collect())
        }
        other => other.clone(),
    }
}

/// Go's `%v` of a float64: shortest digits, exponent form from 1e+06 up (or below 1e-04).
fn go_float(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    let sci = format!("{f:e}"); // e.g. "1.2e6", "-8.64e4", "5e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{f}")
    }
}

/// Go template truthiness: false, 0, nil and empty strings, lists and maps are false.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// How a value prints into the output. Lists and maps must go through toYaml/toJson.
fn to_text(v: &Value) -> Result<String, String> {
    Ok(match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => go_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => {
            return Err(format!(
                "cannot print {other} as text; use toYaml or toJson"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, root: Value) -> Result<String, String> {
        let mut t = Templates::default();
        t.add("t", src)?;
        t.render("t", &root)
    }

    #[test]
    fn trimming_conditionals_and_pipes_behave_like_go_templates() {
        let root = json!({"Values": {"a": "x", "n": 3, "m": {"k": "v"}, "e": ""}});
        let src = "l:\n  {{- if .Values.e }}\n  no\n  {{- else if eq .Values.a \"x\" }}\n  y: {{ .Values.n | quote }}\n  {{- end }}\n  m:\n    {{- toYaml .Values.m | nindent 4 }}\n";
        assert_eq!(
            render(src, root).unwrap(),
            "l:\n  y: \"3\"\n  m:\n    k: v\n"
        );
    }

    #[test]
    fn defines_includes_printf_and_logic() {
        let root = json!({"Values": {"p": "/s", "on": false}, "Release": {"Name": "r"}});
        let src = "{{- define \"n\" -}}\n{{ .Release.Name }}-x\n{{- end }}\n{{ include \"n\" . }} {{ toJson .Values.p | printf \"{%s}\" }} {{ not (or .Values.on (eq 1 2)) }} {{ default \"d\" .Values.on }}";
        // Text after a define stays, as in Go: only the `{{-` of the next action would trim it.
        assert_eq!(render(src, root).unwrap(), "\nr-x {\"/s\"} true d");
    }

    #[test]
    fn numbers_print_like_helms_float64s() {
        let root = json!({"Values": helm_values(&json!({"t": 1200000, "p": 86400, "f": 0.5, "m": {"r": 10001}}))});
        assert_eq!(
            render("{{ .Values.t | quote }} {{ .Values.t | int64 | quote }} {{ .Values.p }} {{ .Values.f }}", root.clone()).unwrap(),
            "\"1.2e+06\" \"1200000\" 86400 0.5"
        );
        assert_eq!(
            render("{{ toYaml .Values.m }} {{ toJson .Values.m }}", root).unwrap(),
            "r: 10001 {\"r\":10001}"
        );
    }

    #[test]
    fn strict_where_helm_is_lenient() {
        let root = json!({"Values": {"a": {"b": 1}}});
        let e = render("{{ .Values.a.c }}", root.clone()).unwrap_err();
        assert!(e.contains(".Values.a.c is not set"), "{e}");
        let e = render("{{ range .Values.a }}{{ end }}", root.clone()).unwrap_err();
        assert!(e.contains("outside the supported subset"), "{e}");
        let e = render("{{ upper \"x\" }}", root.clone()).unwrap_err();
        assert!(e.contains("outside the supported subset"), "{e}");
        let e = render("{{ .Values.a }}", root.clone()).unwrap_err();
        assert!(e.contains("use toYaml"), "{e}");
        let e = render(
            "{{ required \"need x\" .Values.a.b }}{{ fail \"no\" }}",
            root,
        )
        .unwrap_err();
        assert_eq!(e, "execution error at (templates/t): no");
        assert!(render("{{ if .x }}", json!({})).is_err());
    }

    #[test]
    fn required_refuses_only_nil_and_the_empty_string_like_helm() {
        let root = json!({"Values": helm_values(&json!({
            "zero": 0, "no": false, "empty": "", "null": null, "list": [], "gid": 998
        }))});
        for ok in ["zero", "no", "list", "gid"] {
            let src = format!("{{{{ required \"need {ok}\" .Values.{ok} | toJson }}}}");
            assert!(render(&src, root.clone()).is_ok(), "{ok}");
        }
        for missing in ["empty", "null", "absent"] {
            let src = format!("a\n{{{{ required \"{missing} is required\" .Values.{missing} }}}}");
            assert_eq!(
                render(&src, root.clone()).unwrap_err(),
                format!("execution error at (templates/t): {missing} is required"),
            );
        }
        // Outside `required`, a missing key stays an error of the template.
        let e = render("{{ .Values.absent }}", root).unwrap_err();
        assert!(e.contains("is not set"), "{e}");
    }
}
