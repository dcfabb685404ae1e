// /docs: Swagger UI, started from this file rather than an inline script (the CSP allows
// scripts from this origin only). The options are FastAPI's defaults, without the badge from
// validator.swagger.io (validatorUrl: null): the page asks nothing of any other origin.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
