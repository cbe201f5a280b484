/**
 * The size of the scripts' functions, read with the TypeScript compiler: what `npm run shape`
 * prints and test/shape.test.ts holds to (no function or method over 150 lines).
 *
 *   node --import tsx test/lib/shape.ts [FILE ...]    # the 5 longest per file (default: the three scripts)
 */

import { readFileSync, realpathSync } from "node:fs";
import { fileURLToPath } from "node:url";
import ts from "typescript";

/** One function, method, arrow function or function expression with a body. */
export interface FunctionSize {
  file: string;
  line: number;
  name: string;
  lines: number;
}

/** Every function-like node with a body in `file`, longest first. */
export function functionSizes(file: string, text = readFileSync(file, "utf8")): FunctionSize[] {
  const src = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true);
  const out: FunctionSize[] = [];
  const visit = (n: ts.Node): void => {
    if ((ts.isFunctionDeclaration(n) || ts.isMethodDeclaration(n) || ts.isArrowFunction(n) || ts.isFunctionExpression(n) || ts.isConstructorDeclaration(n) || ts.isGetAccessor(n) || ts.isSetAccessor(n)) && n.body) {
      const a = src.getLineAndCharacterOfPosition(n.getStart()).line;
      const b = src.getLineAndCharacterOfPosition(n.end).line;
      const named = (n as { name?: ts.Node }).name;
      const name = ts.isConstructorDeclaration(n) ? "constructor" : named ? named.getText(src) : ts.isVariableDeclaration(n.parent) ? n.parent.name.getText(src) : "(anonymous)";
      const cls = ts.isClassLike(n.parent) && n.parent.name ? `${n.parent.name.getText(src)}.` : "";
      out.push({ file, line: a + 1, name: cls + name, lines: b - a + 1 });
    }
    ts.forEachChild(n, visit);
  };
  visit(src);
  return out.sort((x, y) => y.lines - x.lines);
}

function isMain(): boolean {
  return !!process.argv[1] && fileURLToPath(import.meta.url) === realpathSync(process.argv[1]);
}

if (isMain()) {
  const files = process.argv.slice(2);
  for (const f of files.length ? files : ["hub.ts", "agent.ts", "ban.ts"]) {
    const all = functionSizes(f);
    console.log(`${f}: ${all.length} functions`);
    for (const s of all.slice(0, 5)) console.log(`  ${String(s.lines).padStart(4)} lines  ${f}:${s.line} ${s.name}`);
  }
}
