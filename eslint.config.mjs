// ESLint with typescript-eslint's type-checked rules (`npm run lint`, run by `make test`).
// Zero warnings is the bar: `--max-warnings 0` in package.json.
import eslint from '@eslint/js';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['build/**', 'node_modules/**', 'scripts/**', 'eslint.config.mjs'] },
  eslint.configs.recommended,
  ...tseslint.configs.recommendedTypeChecked,
  {
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    linterOptions: { reportUnusedDisableDirectives: 'error' },
    rules: {
      // Unused names are dead code; a leading underscore marks a deliberately unused parameter.
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      // ffi-rs is loaded on first use (src/native/library.ts), so that importing vblk works where
      // its native addon cannot load; that one lazy require is the exception.
      '@typescript-eslint/no-require-imports': ['error', { allow: ['^ffi-rs$'] }],
    },
  },
  {
    // mocha's `this` (this.timeout, this.skip) needs `function () {}` callbacks; chai's
    // `expect(x).to.be.true` style is property access, which the type-checked rules accept.
    files: ['test/**/*.ts'],
    rules: {
      '@typescript-eslint/no-unused-expressions': 'off',
      // Test doubles implement async interfaces (ImageFile.read, cache write-back) with bodies
      // that have nothing to await; \`async\` keeps them shaped like the real thing.
      '@typescript-eslint/require-await': 'off',
    },
  },
);
