//! JavaScript on WASI: ARL's own runtime (`runtimes/javascript/`, the Boa engine), built from
//! this repository by `build.rs` and carried in the manager's binary. The manager
//! pre-initialises it (engine and prelude built) into its cache once, as it does CPython.
//!
//! A turn's input is one JSON object (`{"op": "run", "code", "n", "cap", ...}`, read by the
//! guest's `Turn`); the guest reports with the same frame as Python's driver ([`crate::Report`]).

/// The runtime module, not initialised; it exports `wizer.initialize`.
pub const WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/javascript.wasm"));

/// The environment every JavaScript session starts with (`process.env`), before the
/// request's own `env`.
pub const BASE_ENV: &[(&str, &str)] = &[
    ("HOME", "/workspace"),
    ("TMPDIR", "/tmp"),
    ("PWD", "/workspace"),
    ("LANG", "C.UTF-8"),
];

/// The languages a JavaScript session runs: JavaScript itself, and TypeScript with its types
/// stripped by the host first.
pub const LANGUAGES: &[&str] = &["javascript", "typescript"];

/// The input of a session's bootstrap turn: its environment (later pairs win).
pub fn bootstrap_input(env: &[(String, String)]) -> String {
    serde_json::json!({ "op": "start", "env": env }).to_string()
}

/// The input of the turn that runs `code` (TypeScript when `typescript`) as the session's
/// `n`th cell.
pub fn turn_input(
    code: &str,
    typescript: bool,
    n: u64,
    cap: usize,
    reseed: bool,
    context: Option<&crate::Context>,
) -> Vec<u8> {
    let cell = prepare(code, typescript);
    let mut turn = serde_json::json!({
        "op": "run", "code": cell.code, "n": n, "cap": cap, "reseed": reseed,
        "declare": cell.declare, "async": cell.is_async, "syntax_error": cell.syntax_error,
    });
    if let Some(c) = context {
        turn["context"] = serde_json::json!({ "id": c.id, "cwd": c.cwd });
    }
    turn.to_string().into_bytes()
}

/// The cell that starts `context` over (`None`: the session's own namespace): the guest makes
/// a new realm for it once the cell has run.
pub fn forget_source(context: Option<&str>) -> String {
    let id = context.map_or_else(|| "null".to_owned(), |c| serde_json::json!(c).to_string());
    format!("__arl_forget({id})")
}

/// A cell that runs `code` as `node SCRIPT ARGS... < stdin` would, in a session of its own:
/// `process.argv` and standard input (`fs.readFileSync(0)`) set, and the cell's value the exit
/// status (`process.exitCode`, else 0; `process.exit(n)` ends the session with `n`, and an
/// uncaught error is the turn's error, which a caller reports as Node does: its stack on
/// stderr, status 1).
pub fn script_cell(code: &str, stdin: &str, script: &str, args: &[String]) -> String {
    let literal = |v: serde_json::Value| v.to_string();
    let argv = literal(serde_json::json!(
        std::iter::once("node")
            .chain(std::iter::once(script))
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
    ));
    let stdin = literal(serde_json::json!(stdin));
    // On the program's first line, so that its line numbers are its own.
    format!("process.argv = {argv}; process._arlStdin = {stdin}; {code}\n;process.exitCode ?? 0")
}

/// A cell made ready for the engine: TypeScript's types stripped, and a cell with top-level
/// `await` rewritten into an async function whose declarations become global first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Prepared {
    pub code: String,
    /// Scripts run before the cell, each on its own, whose "already declared" errors are
    /// ignored: the globals a rewritten cell assigns (`let x;`, `var y;`, whole functions).
    pub declare: Vec<String>,
    /// The cell is an async function expression, called: its promise's value is the cell's.
    pub is_async: bool,
    /// The cell does not parse (TypeScript only: plain JavaScript is left to the engine, which
    /// says the same with its own positions).
    pub syntax_error: Option<String>,
}

/// Prepares `code` (TypeScript when `typescript`) for the engine.
///
/// TypeScript: what `oxc`'s transformer strips and lowers (annotations, interfaces, type
/// aliases, generics, `as`/`satisfies`, `enum`, `namespace`, parameter properties); JSX and
/// decorators are not read.
///
/// Top-level `await` (as Node's REPL): the cell runs as `(async () => { ... })()`; its top-level
/// `var`, `let`, `const` (which becomes `let`), `class` and `function` declarations are made
/// global first and assigned in place, and its last expression statement is the value.
pub fn prepare(code: &str, typescript: bool) -> Prepared {
    use oxc::allocator::Allocator;
    use oxc::span::SourceType;

    let stripped;
    let code = if typescript {
        let allocator = Allocator::default();
        match strip_types(&allocator, code) {
            Ok(js) => {
                stripped = js;
                stripped.as_str()
            }
            Err(e) => {
                return Prepared {
                    code: String::new(),
                    syntax_error: Some(e),
                    ..Prepared::default()
                };
            }
        }
    } else {
        code
    };
    let allocator = Allocator::default();
    let as_script = oxc::parser::Parser::new(&allocator, code, SourceType::cjs()).parse();
    if first_error(&as_script.diagnostics).is_none() {
        return Prepared {
            code: code.to_owned(),
            ..Prepared::default()
        };
    }
    let allocator = Allocator::default();
    let as_module = oxc::parser::Parser::new(&allocator, code, SourceType::mjs()).parse();
    if first_error(&as_module.diagnostics).is_some() || !has_top_level_await(&as_module.program) {
        // Not a top-level-await cell: the engine reports the error with its own positions.
        return Prepared {
            code: code.to_owned(),
            ..Prepared::default()
        };
    }
    rewrite_await_cell(code, &as_module.program)
}

fn strip_types(allocator: &oxc::allocator::Allocator, code: &str) -> Result<String, String> {
    use oxc::codegen::Codegen;
    use oxc::semantic::SemanticBuilder;
    use oxc::span::SourceType;
    use oxc::transformer::{TransformOptions, Transformer};

    let parsed = oxc::parser::Parser::new(allocator, code, SourceType::ts()).parse();
    if let Some(e) = first_error(&parsed.diagnostics) {
        return Err(describe(code, e));
    }
    let mut program = parsed.program;
    let scoping = SemanticBuilder::new()
        .build(&program)
        .semantic
        .into_scoping();
    let options = TransformOptions::default();
    let done = Transformer::new(allocator, std::path::Path::new("cell.ts"), &options)
        .build_with_scoping(scoping, &mut program);
    if let Some(e) = first_error(&done.diagnostics) {
        return Err(describe(code, e));
    }
    Ok(Codegen::new().build(&program).code)
}

fn first_error(
    diagnostics: &[oxc::diagnostics::OxcDiagnostic],
) -> Option<&oxc::diagnostics::OxcDiagnostic> {
    diagnostics
        .iter()
        .find(|d| d.severity == oxc::diagnostics::Severity::Error)
}

/// `message at line L, col C`, as the engine words its own syntax errors.
fn describe(code: &str, e: &oxc::diagnostics::OxcDiagnostic) -> String {
    match e.labels.first() {
        Some(label) => {
            let before = code.get(..label.offset() as usize).unwrap_or(code);
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("{} at line {line}, col {col}", e.message)
        }
        None => e.message.to_string(),
    }
}

fn has_top_level_await(program: &oxc::ast::ast::Program<'_>) -> bool {
    use oxc::ast::ast::{ArrowFunctionExpression, AwaitExpression, ForOfStatement, Function};
    use oxc::ast_visit::{Visit, walk};
    use oxc::syntax::scope::ScopeFlags;

    #[derive(Default)]
    struct Finder(bool);
    impl<'a> Visit<'a> for Finder {
        fn visit_await_expression(&mut self, _: &AwaitExpression<'a>) {
            self.0 = true;
        }
        fn visit_for_of_statement(&mut self, it: &ForOfStatement<'a>) {
            self.0 |= it.r#await;
            walk::walk_for_of_statement(self, it);
        }
        // An `await` inside a function is that function's own.
        fn visit_function(&mut self, _: &Function<'a>, _: ScopeFlags) {}
        fn visit_arrow_function_expression(&mut self, _: &ArrowFunctionExpression<'a>) {}
    }
    let mut finder = Finder::default();
    finder.visit_program(program);
    finder.0
}

fn rewrite_await_cell(code: &str, program: &oxc::ast::ast::Program<'_>) -> Prepared {
    use oxc::ast::ast::{Statement, VariableDeclarationKind};
    use oxc::span::GetSpan;

    let text = |span: oxc::span::Span| &code[span.start as usize..span.end as usize];
    let mut declare = Vec::new();
    let mut body = String::new();
    let last = program.body.len().saturating_sub(1);
    for (i, statement) in program.body.iter().enumerate() {
        match statement {
            Statement::VariableDeclaration(d) => {
                let kind = match d.kind {
                    VariableDeclarationKind::Var => "var",
                    _ => "let",
                };
                let mut assignments = Vec::new();
                for declarator in &d.declarations {
                    for id in declarator.id.get_binding_identifiers() {
                        declare.push(format!("{kind} {};", id.name));
                    }
                    match &declarator.init {
                        Some(init) => assignments.push(format!(
                            "({} = {})",
                            text(declarator.id.span()),
                            text(init.span())
                        )),
                        None if kind == "let" => {
                            assignments
                                .push(format!("({} = undefined)", text(declarator.id.span())));
                        }
                        None => {}
                    }
                }
                if !assignments.is_empty() {
                    body.push_str(&format!("void ({});\n", assignments.join(", ")));
                }
            }
            Statement::FunctionDeclaration(_) => declare.push(text(statement.span()).to_owned()),
            Statement::ClassDeclaration(c) => match &c.id {
                Some(id) => {
                    declare.push(format!("let {};", id.name));
                    body.push_str(&format!("{} = ({});\n", id.name, text(c.span)));
                }
                None => body.push_str(&format!("{}\n", text(c.span))),
            },
            Statement::ExpressionStatement(e) if i == last => {
                body.push_str(&format!("return ({});\n", text(e.expression.span())));
            }
            other => {
                body.push_str(text(other.span()));
                body.push('\n');
            }
        }
    }
    Prepared {
        code: format!("(async () => {{\n{body}}})()"),
        declare,
        is_async: true,
        syntax_error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_cell_is_left_as_it_is() {
        let cell = prepare("let x = 1; x + 1", false);
        assert_eq!(
            cell,
            Prepared {
                code: "let x = 1; x + 1".into(),
                ..Prepared::default()
            }
        );
        let broken = prepare("let y = ;", false);
        assert_eq!(
            broken.code, "let y = ;",
            "the engine reports it, with its own positions"
        );
        assert!(!broken.is_async && broken.syntax_error.is_none());
    }

    #[test]
    fn a_top_level_await_cell_becomes_an_async_function_with_global_declarations() {
        let cell = prepare(
            "const { a, b: [c] } = await f();\nvar v;\nlet w;\nfunction g() { return a }\nclass K {}\nfor await (const q of it) {}\ng() + c",
            false,
        );
        assert!(cell.is_async);
        assert_eq!(
            cell.declare,
            [
                "let a;",
                "let c;",
                "var v;",
                "let w;",
                "function g() { return a }",
                "let K;"
            ]
        );
        assert_eq!(
            cell.code,
            "(async () => {\nvoid (({ a, b: [c] } = await f()));\nvoid ((w = undefined));\nK = (class K {});\nfor await (const q of it) {}\nreturn (g() + c);\n})()"
        );
    }

    #[test]
    fn await_inside_a_function_is_not_top_level() {
        let cell = prepare("async function f() { await 1 }", false);
        assert!(!cell.is_async);
        let cell = prepare("const g = async () => await 1; g", false);
        assert!(!cell.is_async);
    }

    #[test]
    fn typescript_types_are_stripped_and_errors_placed() {
        let cell = prepare(
            "const n: number = 1;\ninterface I { a: string }\nn as number",
            true,
        );
        assert_eq!(cell.syntax_error, None);
        assert!(
            !cell.code.contains("number") && !cell.code.contains("interface"),
            "{}",
            cell.code
        );
        let cell = prepare("let z: number = ;", true);
        assert_eq!(
            cell.syntax_error.as_deref(),
            Some("Unexpected token at line 1, col 17")
        );
        let cell = prepare("const t = await g<string>();\nt", true);
        assert!(cell.is_async && cell.declare == ["let t;"], "{cell:?}");
    }
}
